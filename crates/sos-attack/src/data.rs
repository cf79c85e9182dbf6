//! The datasets the scenarios train and evaluate on, and the fixed split between the two.
//!
//! The files are the public datasets of the repository's `data/` folder (sources and licences in
//! `data/SOURCES.md`). They are built into the binary (~560 KB), so an installed `sos` runs
//! every scenario from any working directory; a folder given with `data_dir`, `--data-dir` or
//! `$SOS_DATA` replaces them. Splits are by row index, never random, so that training and
//! `sos eval` agree on what was held out without sharing any state.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Error, Result};

pub const BENIGN: &str = "benign_instructions.jsonl";
pub const ADVBENCH: &str = "advbench_harmful_behaviors.csv";
pub const PROMPTS: &str = "awesome_chatgpt_prompts.csv";
pub const PASSAGES: &str = "public_domain_passages.jsonl";
pub const PROSE: &str = "prose_passages.jsonl";
pub const PROMPTS_TRAIN: &str = "system_prompts_train.jsonl";
pub const PROMPTS_LONG: &str = "system_prompts_long.jsonl";

/// The files built into the binary, by name.
const EMBEDDED: [(&str, &str); 7] = [
    (BENIGN, include_str!("../../../data/benign_instructions.jsonl")),
    (ADVBENCH, include_str!("../../../data/advbench_harmful_behaviors.csv")),
    (PROMPTS, include_str!("../../../data/awesome_chatgpt_prompts.csv")),
    (PASSAGES, include_str!("../../../data/public_domain_passages.jsonl")),
    (PROSE, include_str!("../../../data/prose_passages.jsonl")),
    (PROMPTS_TRAIN, include_str!("../../../data/system_prompts_train.jsonl")),
    (PROMPTS_LONG, include_str!("../../../data/system_prompts_long.jsonl")),
];

/// A sample of ordinary English (instructions, role prompts, public-domain prose) to tell rare
/// tokens from common ones: the first four built-in files. The later ones are left out, so that
/// which tokens count as rare (and which rows `sos inject` replaces) stays what it was.
pub fn ordinary_text() -> impl Iterator<Item = &'static str> {
    EMBEDDED[..4].iter().map(|(_, text)| *text)
}

/// Where the datasets are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datasets {
    /// The copies built into the binary.
    Embedded,
    /// A folder holding files of the same names.
    Dir(PathBuf),
}

impl Datasets {
    /// `explicit` (a config's `data_dir` or `--data-dir`), else `$SOS_DATA`, else the built-in
    /// copies.
    pub fn resolve(explicit: Option<&Path>) -> Result<Self> {
        if let Some(p) = explicit {
            return if p.is_dir() { Ok(Datasets::Dir(p.to_path_buf())) } else { Err(Error::file(p, "data folder not found")) };
        }
        if let Some(p) = std::env::var_os("SOS_DATA").filter(|p| !p.is_empty()) {
            let p = PathBuf::from(p);
            return if p.is_dir() { Ok(Datasets::Dir(p)) } else { Err(Error::file(&p, "data folder ($SOS_DATA) not found")) };
        }
        Ok(Datasets::Embedded)
    }

    /// What the source is called in messages and records: the folder, or `built-in`.
    pub fn label(&self) -> String {
        match self {
            Datasets::Embedded => "built-in".into(),
            Datasets::Dir(d) => d.display().to_string(),
        }
    }

    /// The name errors about file `name` carry.
    fn path(&self, name: &str) -> PathBuf {
        match self {
            Datasets::Embedded => PathBuf::from(format!("<built-in data>/{name}")),
            Datasets::Dir(d) => d.join(name),
        }
    }

    /// The text of dataset `name`, and the path its errors name.
    fn read(&self, name: &str) -> Result<(PathBuf, Cow<'static, str>)> {
        let path = self.path(name);
        let text = match self {
            Datasets::Embedded => {
                let (_, text) = EMBEDDED.iter().find(|(n, _)| *n == name).ok_or_else(|| Error::file(&path, "no such built-in dataset"))?;
                Cow::Borrowed(*text)
            }
            Datasets::Dir(_) => Cow::Owned(std::fs::read_to_string(&path).map_err(|e| Error::file(&path, format!("cannot read: {e}")))?),
        };
        Ok((path, text))
    }
}

/// Rows of a JSON-lines file, each an object.
pub fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    parse_jsonl(path, &text)
}

/// Rows of JSON-lines `text` (read from `path`), each an object.
fn parse_jsonl(path: &Path, text: &str) -> Result<Vec<Value>> {
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

/// The `columns` of each row of CSV `text` (read from `path`, with a header).
fn parse_csv(path: &Path, text: &str, columns: &[&str]) -> Result<Vec<Vec<String>>> {
    let mut r = csv::Reader::from_reader(text.as_bytes());
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
pub fn instructions(src: &Datasets, held_out: bool) -> Result<Vec<Instruction>> {
    let (path, text) = src.read(BENIGN)?;
    let rows = parse_jsonl(&path, &text)?;
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
pub fn harmful(src: &Datasets, held_out: bool) -> Result<Vec<(String, String)>> {
    let (path, text) = src.read(ADVBENCH)?;
    let rows = parse_csv(&path, &text, &["goal", "target"])?;
    Ok(rows.into_iter().enumerate().filter(|(i, _)| (i % 5 == 4) == held_out).map(|(_, r)| (r[0].clone(), r[1].clone())).collect())
}

/// Secret system prompts for prompt stealing, as `(id, prompt)`. Training: three in four of
/// awesome-chatgpt-prompts' text prompts (short "act as" roles) and lobe-chat-agents' system
/// roles (longer, with markdown sections; many in Chinese). Held out: every fourth
/// awesome-chatgpt-prompts text prompt.
pub fn system_prompts(src: &Datasets, held_out: bool) -> Result<Vec<(String, String)>> {
    let (path, text) = src.read(PROMPTS)?;
    let rows = parse_csv(&path, &text, &["act", "prompt", "type"])?;
    let mut out: Vec<(String, String)> = rows
        .into_iter()
        .filter(|r| r[2] == "TEXT")
        .enumerate()
        .filter(|(i, _)| (i % 4 == 3) == held_out)
        .map(|(_, r)| (r[0].clone(), r[1].clone()))
        .collect();
    if !held_out {
        out.extend(id_and_text(src, PROMPTS_TRAIN, "prompt", |_| true)?);
    }
    Ok(out)
}

/// Long system prompts never trained on (fabric's patterns, LangGPT's Chinese prompts,
/// prompts-for-edu's prose prompts; 564-1,951 characters), as `(id, prompt)`.
pub fn long_system_prompts(src: &Datasets) -> Result<Vec<(String, String)>> {
    id_and_text(src, PROMPTS_LONG, "prompt", |_| true)
}

/// Pride and Prejudice passages `(id, text)` for the copyright token; every third is held out.
/// (The training books of `prose_passages.jsonl` are not trained on yet: the defaults change
/// only with a measured result.)
pub fn passages(src: &Datasets, held_out: bool) -> Result<Vec<(String, String)>> {
    let (path, text) = src.read(PASSAGES)?;
    let rows = parse_jsonl(&path, &text)?;
    let mut out = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        if (i % 3 == 2) == held_out {
            out.push((field(&path, r, i, "id")?, field(&path, r, i, "text")?));
        }
    }
    Ok(out)
}

/// Passages by the six held-out authors of `prose_passages.jsonl` (other periods and genres
/// than anything trained on), as `(id, text)`, taken from the books in turn so that the first
/// few of them (`sos eval --limit`) already span every author.
pub fn other_authors(src: &Datasets) -> Result<Vec<(String, String)>> {
    let (path, text) = src.read(PROSE)?;
    let rows = parse_jsonl(&path, &text)?;
    let mut books: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for (i, r) in rows.iter().enumerate().filter(|(_, r)| r["split"] == "heldout") {
        let book = field(&path, r, i, "book")?;
        let passage = (field(&path, r, i, "id")?, field(&path, r, i, "text")?);
        match books.iter_mut().find(|(b, _)| *b == book) {
            Some((_, v)) => v.push(passage),
            None => books.push((book, vec![passage])),
        }
    }
    let longest = books.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    Ok((0..longest).flat_map(|j| books.iter().filter_map(move |(_, v)| v.get(j).cloned())).collect())
}

/// `(id, key)` of the rows of JSONL dataset `name` that `keep` accepts.
fn id_and_text(src: &Datasets, name: &str, key: &str, keep: impl Fn(&Value) -> bool) -> Result<Vec<(String, String)>> {
    let (path, text) = src.read(name)?;
    let rows = parse_jsonl(&path, &text)?;
    let mut out = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        if keep(r) {
            out.push((field(&path, r, i, "id")?, field(&path, r, i, key)?));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The built-in copies are the files of `data/`, and every split is the size the README states.
    #[test]
    fn built_in_datasets_match_the_data_folder() {
        let dir = Datasets::Dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data"));
        let emb = Datasets::Embedded;
        for (name, _) in EMBEDDED {
            assert_eq!(emb.read(name).unwrap().1, dir.read(name).unwrap().1, "{name}");
        }
        assert_eq!((instructions(&emb, false).unwrap().len(), instructions(&emb, true).unwrap().len()), (175, 252));
        assert_eq!((harmful(&emb, false).unwrap().len(), harmful(&emb, true).unwrap().len()), (416, 104));
        assert_eq!((passages(&emb, false).unwrap().len(), passages(&emb, true).unwrap().len()), (34, 16));
        assert_eq!(other_authors(&emb).unwrap().len(), 60);
        let (train, held) = (system_prompts(&emb, false).unwrap(), system_prompts(&emb, true).unwrap());
        assert_eq!((train.len(), held.len()), (166 + 297, 55));
        let long = long_system_prompts(&emb).unwrap();
        assert_eq!(long.len(), 55);
        // No held-out prompt or passage is trained on.
        assert!(held.iter().chain(&long).all(|t| !train.iter().any(|u| u.1 == t.1)));
        let pp = passages(&emb, false).unwrap().into_iter().chain(passages(&emb, true).unwrap()).collect::<Vec<_>>();
        assert!(other_authors(&emb).unwrap().iter().all(|t| !pp.iter().any(|u| u.1 == t.1)));
    }

    #[test]
    fn a_missing_folder_is_an_error_that_names_it() {
        let e = Datasets::resolve(Some(Path::new("/nonexistent/sos-data"))).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/sos-data"), "{e}");
    }
}
