//! `--format sarif` is valid SARIF 2.1.0: checked against the OASIS schema (tests/data), on a
//! report without findings and on one with findings of every severity.

use std::path::Path;

use sos_audit::sarif::to_sarif;
use sos_audit::{run_audit, AuditRequest, Severity};
use sos_dist::gguf_add::{add_tokens, NewLogits};
use sos_dist::tokens::added_texts;
use sos_model::gguf::{Gguf, TensorType};
use sos_model::tiny::TinySpec;

#[test]
fn sarif_output_is_valid_against_the_schema() {
    let schema: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sarif-schema-2.1.0.json")).unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let d = std::env::temp_dir().join(format!("sos-sarif-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let src = d.join("src model.gguf");
    TinySpec { quant: Some(TensorType::Q8_0), d_model: 64, ..Default::default() }.write_gguf(&src).unwrap();
    let out = d.join("out.gguf");
    let rows = vec![0.5f32; 2 * 64];
    add_tokens(&Gguf::open(&src).unwrap(), &added_texts("cf", 2).unwrap(), &rows, NewLogits::Silent).unwrap().0.write(&out).unwrap();
    for (c, r, results) in [(&src, None, 0), (&out, None, 2), (&out, Some(src.clone()), 3)] {
        let report = run_audit(&AuditRequest { candidate: c.clone(), reference: r, base: None, manifest: None, key: None, fail_on: Severity::High, behavior: sos_audit::Behavior::Off, endpoint: None, deep: false }).unwrap();
        let sarif = to_sarif(&report);
        let errors: Vec<String> = validator.iter_errors(&sarif).map(|e| format!("{e} at {}", e.instance_path)).collect();
        assert!(errors.is_empty(), "{errors:?}\n{sarif:#}");
        let got = sarif["runs"][0]["results"].as_array().unwrap();
        assert_eq!(got.len(), results, "{sarif:#}");
        assert!(got.iter().all(|x| x["level"] == "error" && x["ruleId"].is_string()));
        // Every result points at its rule.
        let rules = sarif["runs"][0]["tool"]["driver"]["rules"].as_array().unwrap();
        assert!(got.iter().all(|x| rules[x["ruleIndex"].as_u64().unwrap() as usize]["id"] == x["ruleId"]));
    }
    // The schema is not vacuous: a result without a message fails it.
    let mut bad = to_sarif(&run_audit(&AuditRequest { candidate: out, reference: None, base: None, manifest: None, key: None, fail_on: Severity::High, behavior: sos_audit::Behavior::Off, endpoint: None, deep: false }).unwrap());
    bad["runs"][0]["results"][0]["message"] = serde_json::json!(7);
    assert!(!validator.is_valid(&bad));
    std::fs::remove_dir_all(&d).unwrap();
}
