//! Multi-document YAML: the one splitter every reader of Kubernetes-style
//! files uses, so each document's errors can name the line it starts on.

/// Documents of `text` (verbatim) with the line each starts on (1-based).
pub fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = vec![(1, String::new())];
    for (i, line) in text.lines().enumerate() {
        if line == "---" || line.starts_with("--- ") {
            docs.push((i + 2, String::new()));
        } else if let Some((_, d)) = docs.last_mut() {
            d.push_str(line);
            d.push('\n');
        }
    }
    docs
}

#[cfg(test)]
mod tests {
    #[test]
    fn splits_with_start_lines() {
        let docs = super::split_documents("a: 1\n---\nb: 2\n--- # c\nc: 3\n");
        let lines: Vec<usize> = docs.iter().map(|d| d.0).collect();
        assert_eq!(lines, [1, 3, 5]);
        assert_eq!(docs[1].1, "b: 2\n");
    }
}
