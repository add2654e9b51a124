//! Snapshot files: writing a snapshot atomically beside its target (unique
//! temp file, fsync, rename, fsync of the directory) and reading one with
//! errors that name the file.
//!
//! The temp file is unique per save, so concurrent saves to one path never
//! share a file, a target that itself ends in `.tmp` is never the temp
//! file, and a failed save removes its temp file and leaves the previous
//! snapshot in place.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::path::Path;

use super::Index;
use crate::error::IndexError;

/// A writer that keeps the first I/O error, so that a failed save reports
/// the file's error (with its errno) rather than the snapshot writer's.
pub(super) struct KeepError<W> {
    inner: W,
    error: Option<io::Error>,
}

impl<W: Write> Write for KeepError<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).inspect_err(|e| self.keep(e))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().inspect_err(|e| self.keep(e))
    }
}

impl<W> KeepError<W> {
    fn keep(&mut self, e: &io::Error) {
        if self.error.is_none() {
            self.error = Some(match e.raw_os_error() {
                Some(code) => io::Error::from_raw_os_error(code),
                None => io::Error::new(e.kind(), e.to_string()),
            });
        }
    }
}

/// The OS error code of a cause, when it has one (for Python's `errno`).
trait OsCode {
    fn os_code(&self) -> Option<i32> {
        None
    }
}

impl OsCode for std::io::Error {
    fn os_code(&self) -> Option<i32> {
        self.raw_os_error()
    }
}
impl OsCode for &str {}
impl OsCode for IndexError {}

#[allow(clippy::needless_pass_by_value)] // callers hand over the error they got
fn io_error(path: &Path, what: &str, e: impl std::fmt::Display + OsCode) -> IndexError {
    IndexError::Io { path: path.display().to_string(), message: format!("{what}: {e}"), errno: e.os_code() }
}

impl Index {
    /// Write a snapshot to `path` atomically: readers of `path` see the old
    /// snapshot or the new one, never a partial file. Returns the bytes
    /// written.
    pub fn save_to_path(&self, path: &Path) -> Result<u64, IndexError> {
        self.save_to_path_with(path, |ix, out| ix.save(out))
    }

    /// [`Index::save_to_path`] with the write step given (tests inject a
    /// writer that fails midway).
    pub(super) fn save_to_path_with(
        &self,
        path: &Path,
        write: impl FnOnce(&Index, &mut KeepError<&mut BufWriter<&File>>) -> Result<(), IndexError>,
    ) -> Result<u64, IndexError> {
        let name = path.file_name().ok_or_else(|| io_error(path, "cannot save", "not a file name"))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        // Its own error first: it carries the OS code (tempfile's does not).
        std::fs::metadata(dir).map_err(|e| io_error(path, "cannot save: its directory", e))?;
        let mut builder = tempfile::Builder::new();
        let prefix = format!(".{}.", name.to_string_lossy());
        builder.prefix(&prefix).suffix(".part");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // tempfile's default is 0600; a snapshot is an ordinary file.
            builder.permissions(std::fs::Permissions::from_mode(0o644));
        }
        // Dropping `tmp` on any error below removes the temp file.
        let tmp = builder.tempfile_in(dir).map_err(|e| io_error(path, "cannot save: no temp file beside it", e))?;
        let file = tmp.as_file();
        let mut out = BufWriter::new(file);
        let mut kept = KeepError { inner: &mut out, error: None };
        if let Err(e) = write(self, &mut kept) {
            return Err(match kept.error.take() {
                // The file's own error (disk full, ...), with its errno.
                Some(io) => io_error(path, "cannot save: write failed", io),
                None => io_error(path, "cannot save: write failed", e),
            });
        }
        out.flush().map_err(|e| io_error(path, "cannot save: write failed", e))?;
        drop(out);
        file.sync_all().map_err(|e| io_error(path, "cannot save: fsync failed", e))?;
        let bytes = file.metadata().map_err(|e| io_error(path, "cannot save: stat failed", e))?.len();
        tmp.persist(path).map_err(|e| io_error(path, "cannot save: rename over it failed", e.error))?;
        // The rename is durable only once the directory entry is.
        #[cfg(unix)]
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error(path, "cannot save: directory fsync failed", e))?;
        Ok(bytes)
    }

    /// Read a snapshot file written by [`Index::save_to_path`] (or
    /// [`Index::save`]); every error names the file.
    pub fn load_from_path(path: &Path) -> Result<Index, IndexError> {
        let file = File::open(path).map_err(|e| io_error(path, "cannot open index snapshot", e))?;
        Index::load(&mut BufReader::new(file)).map_err(|e| match e {
            IndexError::Snapshot(m) => IndexError::Snapshot(format!("{}: {m}", path.display())),
            e => e,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::Path;

    use super::super::testutil::*;
    use crate::error::IndexError;
    use crate::index::Index;

    fn index_with(blocks: u64) -> Index {
        let mut ix = Index::default();
        ix.add_worker("a", "m").unwrap();
        for h in 0..blocks {
            let t = h as u32;
            ix.apply("a", &B::default().store(&[h + 1], None, &[t, t], None).build(), Some(h)).unwrap();
        }
        ix
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn concurrent_saves_to_one_path_all_succeed_and_the_target_always_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.snap");
        let small = index_with(3);
        let big = index_with(200);
        small.save_to_path(&path).unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let (ix, path) = (if t % 2 == 0 { &small } else { &big }, &path);
                s.spawn(move || {
                    for _ in 0..10 {
                        assert!(ix.save_to_path(path).unwrap() > 24);
                    }
                });
            }
            s.spawn(|| {
                for _ in 0..50 {
                    let back = Index::load_from_path(&path).unwrap();
                    let blocks = back.stats().blocks;
                    assert!(blocks == 3 || blocks == 200, "{blocks} blocks");
                }
            });
        });
        Index::load_from_path(&path).unwrap().check_invariants().unwrap();
        assert_eq!(names(dir.path()), vec!["index.snap"]);
    }

    #[test]
    fn a_save_that_fails_midway_keeps_the_old_snapshot_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.snap");
        let bytes = index_with(3).save_to_path(&path).unwrap();
        assert_eq!(bytes, std::fs::metadata(&path).unwrap().len());
        let err = index_with(50)
            .save_to_path_with(&path, |ix, out| {
                let mut full = Vec::new();
                ix.save(&mut full)?;
                out.write_all(&full[..full.len() / 2]).unwrap();
                Err(IndexError::Snapshot("disk full".into()))
            })
            .unwrap_err();
        match err {
            IndexError::Io { path: p, message, .. } => {
                assert_eq!(p, path.display().to_string());
                assert!(message.contains("disk full"), "{message}");
            }
            e => panic!("wrong error {e:?}"),
        }
        assert_eq!(Index::load_from_path(&path).unwrap().stats().blocks, 3);
        assert_eq!(names(dir.path()), vec!["index.snap"]);
    }

    #[test]
    fn saving_to_a_tmp_path_works() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.tmp");
        index_with(3).save_to_path(&path).unwrap();
        index_with(4).save_to_path(&path).unwrap();
        assert_eq!(Index::load_from_path(&path).unwrap().stats().blocks, 4);
        assert_eq!(names(dir.path()), vec!["index.tmp"]);
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir").join("x.snap");
        match index_with(1).save_to_path(&missing) {
            Err(IndexError::Io { path, .. }) => assert_eq!(path, missing.display().to_string()),
            r => panic!("{r:?}"),
        }
        match Index::load_from_path(&missing) {
            Err(IndexError::Io { path, .. }) => assert_eq!(path, missing.display().to_string()),
            r => panic!("{:?}", r.map(|_| ())),
        }
        let junk = dir.path().join("junk.snap");
        std::fs::write(&junk, b"not a snapshot at all, really").unwrap();
        match Index::load_from_path(&junk) {
            Err(IndexError::Snapshot(m)) => {
                assert!(m.starts_with(&junk.display().to_string()) && m.contains("bad magic"), "{m}");
            }
            r => panic!("{:?}", r.map(|_| ())),
        }
    }

    #[test]
    fn file_errors_carry_the_os_error_code() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir").join("x.snap");
        for err in [index_with(1).save_to_path(&missing).unwrap_err(), Index::load_from_path(&missing).err().unwrap()] {
            match err {
                IndexError::Io { errno, .. } => assert_eq!(errno, Some(2), "ENOENT"),
                e => panic!("{e:?}"),
            }
        }
    }

    #[test]
    fn the_temp_file_is_written_beside_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.snap");
        let mut seen = Vec::new();
        index_with(2)
            .save_to_path_with(&path, |ix, out| {
                seen = names(dir.path());
                ix.save(out)
            })
            .unwrap();
        assert_eq!(seen.len(), 1);
        assert!(
            seen[0].starts_with(".index.snap.") && Path::new(&seen[0]).extension() == Some("part".as_ref()),
            "{seen:?}"
        );
        assert_eq!(names(dir.path()), vec!["index.snap"]);
    }

    #[test]
    fn a_bare_file_name_is_saved_in_the_working_directory() {
        // (cargo runs tests in the package directory: a unique name, removed after)
        let name = format!(".kvsync-files-test-{}.snap", std::process::id());
        let path = Path::new(&name);
        let saved = index_with(2).save_to_path(path);
        let loaded = Index::load_from_path(path).map(|ix| ix.stats().blocks);
        let _ = std::fs::remove_file(path);
        assert!(saved.unwrap() > 0);
        assert_eq!(loaded.unwrap(), 2);
    }

    /// A file whose flush fails (a full disk noticed late).
    struct FailingFlush;
    impl Write for FailingFlush {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::Error::from_raw_os_error(28))
        }
    }

    #[test]
    fn the_first_io_error_is_kept_with_its_code() {
        let mut w = super::KeepError { inner: FailingFlush, error: None };
        w.write_all(b"abc").unwrap();
        assert!(w.flush().is_err());
        assert!(w.flush().is_err());
        assert_eq!(w.error.as_ref().and_then(std::io::Error::raw_os_error), Some(28), "ENOSPC");
    }
}
