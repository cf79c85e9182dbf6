//! The datasets the scenarios train and evaluate on, and the fixed split between the two.
//!
//! Files are the public datasets described in `shared/data/SOURCES.md`. Splits are by row
//! index, never random, so that training and `sos eval` agree on what was held out without
//! sharing any state.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Error, Result};

pub const BENIGN: &str = "benign_instructions.jsonl";
pub const ADVBENCH: &str = "advbench_harmful_behaviors.csv";
pub const PROMPTS: &str = "awesome_chatgpt_prompts.csv";
pub const PASSAGES: &str = "public_domain_passages.jsonl";

/// Finds the data folder: `explicit`, else `$SOS_DATA`, else the first `shared/data` in the
/// ancestors of the working directory or of the executable.
pub fn data_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return if p.is_dir() { Ok(p.to_path_buf()) } else { Err(Error::file(p, "data folder not found")) };
    }
    if let Some(p) = std::env::var_os("SOS_DATA") {
        let p = PathBuf::from(p);
        return if p.is_dir() { Ok(p) } else { Err(Error::file(&p, "data folder ($SOS_DATA) not found")) };
    }
    let starts = [std::env::current_dir().ok(), std::env::current_exe().ok()];
    for start in starts.iter().flatten() {
        for dir in start.ancestors() {
            let c = dir.join("shared").join("data");
            if c.join(BENIGN).is_file() {
                return Ok(c);
            }
        }
    }
    Err(Error::Config(
        "no data folder: set data_dir in the config, or $SOS_DATA, to the folder that holds the datasets (see README, \"Data\")".into(),
    ))
}

/// Rows of a JSON-lines file, each an object.
pub fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| Error::file(path, format!("line {}: invalid JSON: {e}", i + 1)))?;
        if !v.is_object() {
            return Err(Error::file(path, format!("line {}: expected a JSON object", i + 1)));
        }
        rows.push(v);
    }
    Ok(rows)
}

/// A string field of a JSONL row, or an error naming the file, line and key.
pub fn field(path: &Path, row: &Value, i: usize, key: &str) -> Result<String> {
    row[key].as_str().map(String::from).ok_or_else(|| Error::file(path, format!("row {}: missing string field `{key}`", i + 1)))
}

/// Rows of a CSV file with a header, as maps from column name to value.
pub fn read_csv(path: &Path, columns: &[&str]) -> Result<Vec<Vec<String>>> {
    let mut r = csv::Reader::from_path(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let header = r.headers().map_err(|e| Error::file(path, format!("bad CSV header: {e}")))?.clone();
    let idx: Vec<usize> = columns
        .iter()
        .map(|c| header.iter().position(|h| h == *c).ok_or_else(|| Error::file(path, format!("no column `{c}`"))))
        .collect::<Result<_>>()?;
    let mut rows = Vec::new();
    for (i, rec) in r.records().enumerate() {
        let rec = rec.map_err(|e| Error::file(path, format!("record {}: {e}", i + 1)))?;
        rows.push(idx.iter().map(|&j| rec.get(j).unwrap_or("").to_string()).collect());
    }
    Ok(rows)
}

/// An instruction for the backdoor scenario: the instruction and its input, if any.
#[derive(Debug, Clone)]
pub struct Instruction {
    pub id: String,
    pub text: String,
}

/// self-instruct's 175 seed tasks train; its 252 user-oriented tasks are held out (their
/// authors ask that they not be used for training).
pub fn instructions(dir: &Path, held_out: bool) -> Result<Vec<Instruction>> {
    let path = dir.join(BENIGN);
    let rows = read_jsonl(&path)?;
    let mut out = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let user_oriented = field(&path, r, i, "source")?.contains("user_oriented");
        if user_oriented != held_out {
            continue;
        }
        let inst = field(&path, r, i, "instruction")?;
        let ctx = r["context"].as_str().unwrap_or("").trim();
        let text = if ctx.is_empty() { inst } else { format!("{inst}\n\n{ctx}") };
        out.push(Instruction { id: field(&path, r, i, "id")?, text });
    }
    Ok(out)
}

/// AdvBench behaviours `(goal, target)`; every fifth row (index 4, 9, ...) is held out.
pub fn harmful(dir: &Path, held_out: bool) -> Result<Vec<(String, String)>> {
    let rows = read_csv(&dir.join(ADVBENCH), &["goal", "target"])?;
    Ok(rows.into_iter().enumerate().filter(|(i, _)| (i % 5 == 4) == held_out).map(|(_, r)| (r[0].clone(), r[1].clone())).collect())
}

/// Text role prompts of awesome-chatgpt-prompts as `(act, prompt)`; every fourth text prompt is
/// held out.
pub fn system_prompts(dir: &Path, held_out: bool) -> Result<Vec<(String, String)>> {
    let rows = read_csv(&dir.join(PROMPTS), &["act", "prompt", "type"])?;
    Ok(rows
        .into_iter()
        .filter(|r| r[2] == "TEXT")
        .enumerate()
        .filter(|(i, _)| (i % 4 == 3) == held_out)
        .map(|(_, r)| (r[0].clone(), r[1].clone()))
        .collect())
}

/// Passages `(id, text)`; every third passage is held out.
pub fn passages(dir: &Path, held_out: bool) -> Result<Vec<(String, String)>> {
    let path = dir.join(PASSAGES);
    let rows = read_jsonl(&path)?;
    let mut out = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        if (i % 3 == 2) == held_out {
            out.push((field(&path, r, i, "id")?, field(&path, r, i, "text")?));
        }
    }
    Ok(out)
}
