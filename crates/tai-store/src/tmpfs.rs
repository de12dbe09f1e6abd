//! A small filesystem of its own for a store in a test, to fill up: what a
//! full disk does to writes and flushes. Needs root (`mount -t tmpfs`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a directory, unmounted when dropped.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount`'s syntax: `2m`) on `dir`,
    /// creating it; panics, saying why, if it cannot.
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs on {} (this test needs root): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }

    /// Gives the filesystem `size` in all (keeping what it holds).
    pub fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A store on a tmpfs of its own, in a fresh temporary directory. Its
/// fields drop in order: the store, the mount, the directory.
pub struct TmpfsStore {
    pub store: crate::Store,
    _disk: Tmpfs,
    _dir: tempfile::TempDir,
}

impl TmpfsStore {
    /// Opens a new store on a tmpfs of `size` (`2m`); panics if it cannot.
    pub fn open(size: &str) -> TmpfsStore {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let disk = dir.path().join("disk");
        let mount = Tmpfs::mount(&disk, size);
        TmpfsStore {
            store: crate::Store::open(&disk.join("data")).expect("a store on the tmpfs"),
            _disk: mount,
            _dir: dir,
        }
    }
}

/// Fills the disk under `store` with commits of 8 KiB dead letters (tenant
/// `pad`), never waited for, until one fails on it (sled writes its buffers
/// out itself as they fill): the store has failed then. Returns that
/// commit's error; panics if 10,000 of them fit.
pub fn fill(store: &crate::Store) -> crate::StoreError {
    use tai_core::msg::WriteSet;
    use tai_core::signal::{parse_signal, DeadLetter};
    (0..10_000)
        .find_map(|i| {
            let body = format!(
                r#"{{"id":"pad-{i}","tenant_id":"pad","sku_id":"pad","kind":"payment","payload":{{"pad":"{}"}}}}"#,
                "x".repeat(8192)
            );
            let set = WriteSet {
                dead_letters: vec![DeadLetter {
                    signal: parse_signal(body.as_bytes(), 1, String::new).expect("a signal"),
                    reason: "halted".into(),
                    at_ms: 1,
                }],
                ..WriteSet::default()
            };
            store.commit(&[], None, &set).err()
        })
        .expect("the disk filled")
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}
