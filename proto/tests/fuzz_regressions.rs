//! Replays every input saved under fuzz/regressions/<target>/ (crashes the
//! fuzzers found, and seeds) through the target's body.
#[test]
fn saved_fuzz_inputs_do_not_crash() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
    let mut n = 0;
    for (name, target) in testbus_proto::fuzzing::TARGETS {
        let Ok(dir) = std::fs::read_dir(root.join(name)) else { continue };
        for e in dir.flatten() {
            if e.file_name() == ".gitkeep" {
                continue;
            }
            target(&std::fs::read(e.path()).unwrap());
            n += 1;
        }
    }
    assert!(n > 0, "no saved inputs under {}", root.display());
}
