//! Rows as a table, JSON or YAML: typed rows (the agent's views) with their
//! own columns and cells, and serializable rows picked by column name (pins,
//! checks, analysis).

use std::fmt::Display;

use serde::Serialize;
use serde_json::Value;

use crate::{Args, CtlError, Output};

/// A row with typed cells: its table columns, and one cell per column.
/// JSON and YAML serialize the row itself.
pub(crate) trait Row: Serialize {
    const COLUMNS: &'static [&'static str];
    fn cells(&self) -> Vec<String>;
}

/// One counter (agent or eBPF side), a row of its own.
#[derive(Serialize)]
pub(crate) struct Counter {
    pub counter: &'static str,
    pub value: u64,
}

impl Row for Counter {
    const COLUMNS: &'static [&'static str] = &["counter", "value"];
    fn cells(&self) -> Vec<String> {
        vec![self.counter.into(), self.value.to_string()]
    }
}

/// Counters as rows.
pub(crate) fn counters(c: impl IntoIterator<Item = (&'static str, u64)>) -> Vec<Counter> {
    c.into_iter()
        .map(|(counter, value)| Counter { counter, value })
        .collect()
}

/// A cell of an optional value: `-` when absent.
pub(crate) fn opt<T: Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".into(), T::to_string)
}

/// Prints typed rows as JSON or YAML (stable, documented in docs/cli.md) or
/// as an aligned table.
pub(crate) fn emit_rows<T: Row>(args: &Args, rows: &[T]) -> Result<(), CtlError> {
    match args.output {
        Output::Table => {
            print!("{}", rows_table(rows));
            Ok(())
        }
        _ => print_doc(args, rows),
    }
}

/// Prints serializable rows as JSON or YAML, or as a table of the given
/// columns (picked from each row's JSON by name).
pub(crate) fn emit<T: Serialize>(args: &Args, rows: &[T], columns: &[&str]) -> Result<(), CtlError> {
    let values = to_values(rows)?;
    match args.output {
        Output::Table => {
            let cells = values
                .iter()
                .map(|r| columns.iter().map(|c| cell(&r[*c])).collect())
                .collect();
            print!("{}", table(columns, cells));
            Ok(())
        }
        _ => print_doc(args, &values),
    }
}

/// Rows as JSON values (to pick columns from, or to join fields into).
pub(crate) fn to_values<T: Serialize>(rows: &[T]) -> Result<Vec<Value>, CtlError> {
    rows.iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()
        .map_err(|e| CtlError::Other(format!("cannot serialize rows: {e}")))
}

/// Prints one document as YAML with `-o yaml`, else as JSON.
pub(crate) fn print_doc<T: Serialize + ?Sized>(args: &Args, doc: &T) -> Result<(), CtlError> {
    let bad = |e: &dyn Display| CtlError::Other(format!("cannot serialize output: {e}"));
    match args.output {
        Output::Yaml => print!("{}", serde_norway::to_string(doc).map_err(|e| bad(&e))?),
        _ => println!("{}", serde_json::to_string_pretty(doc).map_err(|e| bad(&e))?),
    }
    Ok(())
}

/// Typed rows as an aligned table.
pub(crate) fn rows_table<T: Row>(rows: &[T]) -> String {
    table(T::COLUMNS, rows.iter().map(Row::cells).collect())
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn table(columns: &[&str], cells: Vec<Vec<String>>) -> String {
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| cells.iter().map(|r| r[i].len()).chain([c.len()]).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    let line = |out: &mut String, items: &[String]| {
        let l: Vec<String> = items.iter().zip(&widths).map(|(s, w)| format!("{s:<w$}")).collect();
        out.push_str(l.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut out, &columns.iter().map(|c| c.to_uppercase()).collect::<Vec<_>>());
    for r in &cells {
        line(&mut out, r);
    }
    if cells.is_empty() {
        out.push_str("(none)\n");
    }
    out
}
