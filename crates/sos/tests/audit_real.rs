//! `sos audit --deep` on the real default model: rows planted in its tied token table, at the
//! table's median norm (what `--stealth` does) and with the table left tied (no output layer
//! to compare with: what `--tied-logits` makes), are named by the nearest-row search alone, and
//! no row of the clean table is.

use rand::{Rng, SeedableRng};
use sos_audit::{run_audit, AuditRequest, Behavior, Severity};
use sos_dist::gguf_replace::replace_tokens;
use sos_dist::tokens::rare_tokens;
use sos_model::gguf::Gguf;
use sos_model::{cache, LoadedModel};

#[test]
fn deep_audit_names_norm_matched_rows_in_a_tied_table() {
    let src = cache::resolve(None, &mut |m| eprintln!("{m}")).unwrap();
    let d = std::env::temp_dir().join(format!("sos-audit-real-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let out = d.join("tied-stealth.gguf");
    let g = Gguf::open(&src).unwrap();
    let (tok, _) = LoadedModel::open_text(&src, None).unwrap();
    // Eight rare tokens, as `sos inject --mode replace-token` picks them, given directions no
    // token has (seeded) at the table's median norm.
    let (ids, texts) = rare_tokens(&tok, |_| true, 8, [""]).unwrap();
    let width = g.tensor_info("token_embd.weight").unwrap().shape()[1];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let req = |p: &std::path::Path, deep: bool| AuditRequest { candidate: p.to_path_buf(), reference: None, base: None, manifest: None, key: None, fail_on: Severity::Medium, behavior: Behavior::Off, endpoint: None, deep };
    let median = run_audit(&req(&src, false)).unwrap().rows.unwrap().median_norm;
    let mut rows = Vec::new();
    for _ in 0..ids.len() {
        let v: Vec<f32> = (0..width).map(|_| (0..4).map(|_| rng.gen::<f32>() - 0.5).sum()).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        rows.extend(v.iter().map(|x| x / norm * median));
    }
    let (mut w, _) = replace_tokens(&g, &ids, &texts, &rows).unwrap();
    assert!(w.remove_tensor("output.weight"), "the tied table got an output layer; drop it to keep the table tied");
    w.write(&out).unwrap();

    let audit = |deep: bool| run_audit(&req(&out, deep)).unwrap();
    // Without the search nothing is seen: the rows are norm-matched and the table is tied.
    let plain = audit(false);
    assert!(plain.findings.iter().all(|f| f.severity < Severity::Medium), "{:?}", plain.findings);
    let r = audit(true);
    let f = r.findings.iter().find(|f| f.id == "weights.isolated-rows").expect("the planted rows are found");
    assert_eq!(f.severity, Severity::Medium);
    let (mut got, mut want) = (f.token_ids.clone(), ids.clone());
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want, "exactly the planted rows: {}", f.evidence);
    assert_eq!(r.verdict, "fail", "at --fail-on medium");
    let iso = r.isolation.as_ref().unwrap();
    assert!(iso.tail > 0.5 && iso.tail < 0.6, "SmolLM2's 0.1% quantile is 0.538: {}", iso.tail);
    std::fs::remove_dir_all(&d).unwrap();
}
