//! Every committed fuzz input, replayed through its target: the seed corpus
//! (`fuzz/corpus/<target>/`) and the inputs that once failed (`fuzz/regressions/<target>/`).

#![allow(clippy::unwrap_used)]

use std::path::Path;

fn replay(root: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(root);
    let mut count = 0;
    for (name, target) in fuzz::TARGETS {
        let Ok(entries) = std::fs::read_dir(root.join(name)) else {
            continue;
        };
        let mut paths: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
        paths.sort();
        for path in paths {
            let input = std::fs::read(&path).unwrap();
            eprintln!("{name}: {}", path.display());
            target(&input);
            count += 1;
        }
    }
    count
}

#[test]
fn inputs_that_once_failed_pass() {
    replay("regressions");
}

#[test]
fn the_seed_corpus_passes() {
    assert!(replay("corpus") > 0, "the seed corpus is empty");
}
