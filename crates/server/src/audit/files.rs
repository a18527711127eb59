//! The audit log on disk: JSON lines appended to `audit.log`, rotated by size into
//! `audit.N.log` (N rising with each rotation, so the oldest has the smallest N), of
//! which the newest `keep` are kept.
//!
//! Readers and rotation share a lock: a rotation never renames or removes a file while a
//! reader goes through them (it waits for the next line instead), so a read sees every
//! line once, in order.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The file lines are appended to.
const CURRENT: &str = "audit.log";

/// The name of the `n`th rotated file.
fn rotated_name(n: u64) -> String {
    format!("audit.{n:06}.log")
}

/// The index of a rotated file's name, if it is one.
fn rotated_index(name: &str) -> Option<u64> {
    name.strip_prefix("audit.")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// The rotated files in `dir`, oldest first.
fn rotated(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(n) = entry.file_name().to_str().and_then(rotated_index) {
            files.push((n, entry.path()));
        }
    }
    files.sort();
    Ok(files)
}

/// Where the log is and how it rotates.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    /// The directory holding the files.
    pub dir: PathBuf,
    /// A file is rotated before a line would take it past this many bytes.
    pub max_file_size: u64,
    /// Rotated files kept.
    pub keep: usize,
    /// Held shared by readers, exclusively by a rotation.
    pub lock: Arc<RwLock<()>>,
}

/// The writing end: the current file, buffered.
pub(super) struct Writer {
    layout: Layout,
    current: BufWriter<File>,
    /// Bytes in the current file, buffered ones included.
    size: u64,
    /// The index the next rotated file gets.
    next: u64,
}

impl Writer {
    /// Open (creating) the directory and the current file.
    pub fn open(layout: Layout) -> io::Result<Writer> {
        // Who did what from where is for the server's own user (and root) only.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&layout.dir)?;
        let next = rotated(&layout.dir)?.last().map_or(1, |(n, _)| n + 1);
        let (current, size) = open_current(&layout.dir)?;
        Ok(Writer {
            layout,
            current,
            size,
            next,
        })
    }

    /// Append one line (`line` holds no newline), rotating first if it would not fit.
    pub fn append(&mut self, line: &str) -> io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.layout.max_file_size {
            self.rotate()?;
        }
        self.current.write_all(line.as_bytes())?;
        self.current.write_all(b"\n")?;
        self.size += len;
        Ok(())
    }

    /// Hand what is buffered to the operating system.
    pub fn flush(&mut self) -> io::Result<()> {
        self.current.flush()
    }

    /// Rename the current file to the next rotated name, remove the oldest beyond
    /// `keep`, and start a new current file; put off while a reader holds the lock.
    fn rotate(&mut self) -> io::Result<()> {
        let lock = Arc::clone(&self.layout.lock);
        let Ok(_exclusive) = lock.try_write() else {
            return Ok(());
        };
        self.current.flush()?;
        let dir = &self.layout.dir;
        std::fs::rename(dir.join(CURRENT), dir.join(rotated_name(self.next)))?;
        self.next += 1;
        let files = rotated(dir)?;
        let excess = files.len().saturating_sub(self.layout.keep);
        for (_, path) in files.iter().take(excess) {
            std::fs::remove_file(path)?;
        }
        let (current, size) = open_current(dir)?;
        self.current = current;
        self.size = size;
        Ok(())
    }
}

/// The current file, opened for appending, and its length.
fn open_current(dir: &Path) -> io::Result<(BufWriter<File>, u64)> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(dir.join(CURRENT))?;
    let size = file.metadata()?.len();
    Ok((BufWriter::new(file), size))
}

/// Every complete line of the log for which `keep` holds, oldest first; the last `limit`
/// of them.
pub(super) fn read(
    layout: &Layout,
    limit: usize,
    keep: impl Fn(&str) -> bool,
) -> io::Result<Vec<String>> {
    let _shared = layout.lock.read().unwrap_or_else(|p| p.into_inner());
    let mut paths: Vec<PathBuf> = match rotated(&layout.dir) {
        Ok(files) => files.into_iter().map(|(_, path)| path).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    paths.push(layout.dir.join(CURRENT));
    let mut lines = std::collections::VecDeque::new();
    for path in paths {
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut reader = BufReader::new(file);
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                break;
            }
            // A line still being written has no newline yet.
            let Some(complete) = line.strip_suffix('\n') else {
                break;
            };
            if !keep(complete) {
                continue;
            }
            if lines.len() == limit {
                lines.pop_front();
            }
            if limit > 0 {
                lines.push_back(complete.to_owned());
            }
        }
    }
    Ok(lines.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(dir: &Path, max_file_size: u64, keep: usize) -> Layout {
        Layout {
            dir: dir.to_owned(),
            max_file_size,
            keep,
            lock: Arc::default(),
        }
    }

    fn line(i: usize) -> String {
        format!("{{\"n\":{i:04},\"pad\":\"{}\"}}", "x".repeat(40))
    }

    #[test]
    fn rotation_keeps_the_newest_files_and_reads_them_in_order_without_a_gap() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = layout(tmp.path(), 200, 2);
        let mut writer = Writer::open(layout.clone()).unwrap();
        let total = 50;
        for i in 0..total {
            writer.append(&line(i)).unwrap();
        }
        writer.flush().unwrap();
        let mut names: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        // The current file and the two newest rotated ones; none over the size.
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.contains(&CURRENT.to_owned()), "{names:?}");
        let indices: Vec<u64> = names.iter().filter_map(|n| rotated_index(n)).collect();
        assert_eq!(indices.len(), 2);
        assert_eq!(indices[1], indices[0] + 1, "{names:?}");
        assert!(indices[0] > 1, "older files were removed: {names:?}");
        for name in &names {
            let len = std::fs::metadata(tmp.path().join(name)).unwrap().len();
            assert!(len <= 200, "{name} holds {len} bytes");
        }
        // What is read is a gapless run of the newest lines, oldest first, and it is
        // every line the files hold.
        let read = read(&layout, usize::MAX, |_| true).unwrap();
        let on_disk: usize = names
            .iter()
            .map(|n| {
                std::fs::read_to_string(tmp.path().join(n))
                    .unwrap()
                    .lines()
                    .count()
            })
            .sum();
        assert_eq!(read.len(), on_disk);
        assert!(read.len() < total && read.len() >= 4, "{}", read.len());
        let expected: Vec<String> = (total - read.len()..total).map(line).collect();
        assert_eq!(read, expected);
        // A limit keeps the newest; a filter applies before it.
        assert_eq!(read_last(&layout, 2), expected[expected.len() - 2..]);
        let even: Vec<String> = expected
            .iter()
            .filter(|l| ["0,", "2,", "4,", "6,", "8,"].iter().any(|d| l.contains(d)))
            .cloned()
            .collect();
        let filtered = super::read(&layout, usize::MAX, |l| even.iter().any(|e| e == l)).unwrap();
        assert_eq!(filtered, even);
    }

    fn read_last(layout: &Layout, n: usize) -> Vec<String> {
        read(layout, n, |_| true).unwrap()
    }

    #[test]
    fn a_reopened_log_continues_the_numbering_and_appends() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = layout(tmp.path(), 150, 10);
        let mut writer = Writer::open(layout.clone()).unwrap();
        for i in 0..10 {
            writer.append(&line(i)).unwrap();
        }
        writer.flush().unwrap();
        drop(writer);
        let mut writer = Writer::open(layout.clone()).unwrap();
        for i in 10..20 {
            writer.append(&line(i)).unwrap();
        }
        writer.flush().unwrap();
        let all = read(&layout, usize::MAX, |_| true).unwrap();
        assert_eq!(all, (0..20).map(line).collect::<Vec<_>>());
    }

    #[test]
    fn a_reader_puts_rotation_off_instead_of_losing_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = layout(tmp.path(), 100, 1);
        let mut writer = Writer::open(layout.clone()).unwrap();
        {
            let _reading = layout.lock.read().unwrap();
            for i in 0..10 {
                writer.append(&line(i)).unwrap();
            }
            writer.flush().unwrap();
        }
        // Nothing was renamed or removed while the reader held the lock.
        assert_eq!(rotated(tmp.path()).unwrap().len(), 0);
        assert_eq!(read(&layout, usize::MAX, |_| true).unwrap().len(), 10);
    }
}
