//! `ferryctl analyze`: mesh YAML checked offline with the control plane's
//! own parser and checks.

use std::path::PathBuf;

use crate::{emit, Args, CtlError, Output};

/// Parses and cross-checks the given YAML as one cluster.
pub(crate) fn analyze(args: &Args, paths: &[PathBuf], all: bool) -> Result<(), CtlError> {
    use ferry_control::{
        model::{parse_file, Severity},
        source::files::{merge, yaml_files},
    };
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            files.extend(yaml_files(p));
        } else if p.exists() {
            files.push(p.clone());
        } else {
            return Err(CtlError::Other(format!("{}: no such file or directory", p.display())));
        }
    }
    let mut problems = Vec::new();
    let mut parsed = Vec::new();
    for f in &files {
        let name = f.display().to_string();
        let text = std::fs::read_to_string(f).map_err(|e| CtlError::Other(format!("{name}: {e}")))?;
        let (docs, found) = parse_file(&name, &text);
        problems.extend(found);
        parsed.push((name, docs));
    }
    let (cluster, dups) = merge(parsed.iter().map(|(n, d)| (n.clone(), d.as_slice())));
    problems.extend(dups);
    problems.extend(ferry_control::analyze::analyze(&cluster));
    problems.retain(|p| all || p.severity != Severity::Info);
    problems.sort_by(|a, b| (a.severity, &a.file, a.line).cmp(&(b.severity, &b.file, b.line)));
    let errors = problems.iter().filter(|p| p.severity == Severity::Error).count();
    match args.output {
        Output::Table => {
            for p in &problems {
                println!("{p}");
            }
            let warnings = problems.iter().filter(|p| p.severity == Severity::Warning).count();
            println!(
                "{} file(s), {} object(s): {errors} error(s), {warnings} warning(s)",
                files.len(),
                cluster.objects.len()
            );
        }
        _ => emit(args, &problems, &[])?,
    }
    if errors > 0 {
        std::process::exit(6);
    }
    Ok(())
}
