//! Rows as a table, JSON or YAML.

use serde::Serialize;
use serde_json::Value;

use crate::{Args, CtlError, Output};

/// Prints rows as JSON (stable, documented in docs/cli.md) or as an aligned table.
pub(crate) fn emit<T: Serialize>(args: &Args, rows: &[T], columns: &[&str]) -> Result<(), CtlError> {
    let values: Vec<Value> = rows
        .iter()
        .map(|r| serde_json::to_value(r).unwrap_or(Value::Null))
        .collect();
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&values).unwrap_or_default()),
        Output::Yaml => print!("{}", serde_norway::to_string(&values).unwrap_or_default()),
        Output::Table => print!("{}", table(&values, columns)),
    }
    Ok(())
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn table(rows: &[Value], columns: &[&str]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| cell(&r[*c])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| cells.iter().map(|r| r[i].len()).chain([c.len()]).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    let line = |out: &mut String, items: Vec<String>| {
        let l: Vec<String> = items.iter().zip(&widths).map(|(s, w)| format!("{s:<w$}")).collect();
        out.push_str(l.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut out, columns.iter().map(|c| c.to_uppercase()).collect());
    for r in cells {
        line(&mut out, r);
    }
    if rows.is_empty() {
        out.push_str("(none)\n");
    }
    out
}
