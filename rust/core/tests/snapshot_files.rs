//! Snapshot file errors name the path and say what is wrong, for paths
//! that cannot be files at all.

use std::path::Path;

use kvsync_core::{Index, IndexError};

#[test]
fn saving_to_a_path_without_a_file_name_is_refused_without_touching_anything() {
    let mut ix = Index::default();
    ix.add_worker("a", "m").unwrap();
    for p in ["/", "/tmp/.."] {
        match ix.save_to_path(Path::new(p)) {
            Err(IndexError::Io { path, message, errno }) => {
                assert_eq!(path, p);
                assert_eq!(message, "cannot save: not a file name");
                assert_eq!(errno, None, "no OS call failed");
            }
            r => panic!("{p}: {r:?}"),
        }
    }
}

#[test]
fn loading_a_directory_names_it() {
    let dir = tempfile::tempdir().unwrap();
    match Index::load_from_path(dir.path()) {
        Err(IndexError::Snapshot(m)) => {
            let want = format!("{}: cannot read header", dir.path().display());
            assert!(m.starts_with(&want), "{m:?} does not start with {want:?}");
        }
        Err(IndexError::Io { path, .. }) => assert_eq!(path, dir.path().display().to_string()),
        r => panic!("{:?}", r.map(|_| ())),
    }
}
