//! Golden tests of job files: every file in `jobs/` validates; invalid files produce exactly the
//! expected diagnostics (snapshots); the shipped JSON Schema is the one the registry makes.

mod common;

use common::*;

#[test]
fn every_job_file_validates() {
    let mut n = 0;
    for entry in std::fs::read_dir(repo_root().join("jobs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let spec = ledgerflow::spec::parse(&path.display().to_string(), &text, &|_| None)
                .unwrap_or_else(|d| panic!("{}:\n{d}", path.display()));
            ledgerflow::plan::Plan::new(&spec)
                .unwrap_or_else(|_| panic!("{} plans", path.display()));
            let out = run_ok(ledgerflow().arg("validate").arg(&path));
            assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
            n += 1;
        }
    }
    assert!(n >= 2, "jobs/ holds the quick start and ingest jobs");
}

#[test]
fn invalid_job_files_report_every_problem() {
    let mut names: Vec<_> = std::fs::read_dir(repo_root().join("tests/fixtures/invalid"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    assert!(names.len() >= 5);
    for path in names {
        let rel = path
            .strip_prefix(repo_root())
            .unwrap()
            .display()
            .to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let err = match ledgerflow::spec::parse(&rel, &text, &|_| None) {
            Ok(_) => panic!("{rel} should not validate"),
            Err(d) => d.to_string(),
        };
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        insta::assert_snapshot!(stem, err);
        // The CLI says the same and fails.
        let out = ledgerflow()
            .arg("validate")
            .arg(&rel)
            .env("LEDGERFLOW_TEST_SURELY_UNSET", "")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{rel}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("{rel}:")));
    }
}

#[test]
fn shipped_json_schema_is_current() {
    let shipped = std::fs::read_to_string(repo_root().join("schemas/job.schema.json")).unwrap();
    let current = serde_json::to_string_pretty(&ledgerflow::job_schema::job_schema()).unwrap();
    assert_eq!(
        shipped.trim(),
        current.trim(),
        "schemas/job.schema.json is stale: run `ledgerflow schema > schemas/job.schema.json`"
    );
}
