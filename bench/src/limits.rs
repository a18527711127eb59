//! The machine's own limits, measured in the same run and on the same disk as the servers:
//! what a blob server on this machine could reach at best.

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::loadgen;
use crate::payload::Base;
use crate::registry;
use crate::report::{Limits, Summary};
use crate::servers::Cpu;

/// Bytes per MB in every throughput figure (decimal megabytes).
pub const MB: f64 = 1e6;
/// Bytes per GiB, for the CPU-seconds-per-GiB figures.
pub const GIB: f64 = (1u64 << 30) as f64;

/// One core's SHA-256 throughput over `slices`, in MB/s.
pub async fn sha256_one_core(slices: &[Bytes]) -> Result<f64> {
    let slices = slices.to_vec();
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        for s in &slices {
            hasher.update(s);
            total += s.len() as u64;
        }
        std::hint::black_box(hasher.finalize());
        mbps(total, start.elapsed().as_secs_f64())
    })
    .await?
}

/// Write `slices` to a new file in `dir`, then fsync it, in MB/s (write and fsync timed
/// together); the file is removed afterwards.
pub async fn disk_write_fsync(dir: &Path, slices: &[Bytes]) -> Result<f64> {
    let path = dir.join("limits-write.bin");
    let slices = slices.to_vec();
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let mut file = std::fs::File::create(&path)?;
        let total = write_slices(&mut file, &slices)?;
        file.sync_all()?;
        let rate = mbps(total, start.elapsed().as_secs_f64());
        drop(file);
        std::fs::remove_file(&path)?;
        rate
    })
    .await?
}

/// Write `slices` to a new file in `dir` while another thread keeps calling `fdatasync`
/// on it, then fsync: the disk's durable write rate when write-back overlaps the writes
/// (as a server streaming a blob to disk can arrange), in MB/s. The file is removed.
pub async fn disk_write_fsync_overlapped(dir: &Path, slices: &[Bytes]) -> Result<f64> {
    let path = dir.join("limits-write-overlapped.bin");
    let slices = slices.to_vec();
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let mut file = std::fs::File::create(&path)?;
        let syncer = file.try_clone()?;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = done.clone();
        let flusher = std::thread::spawn(move || -> std::io::Result<()> {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                syncer.sync_data()?;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Ok(())
        });
        let total = write_slices(&mut file, &slices)?;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        flusher
            .join()
            .map_err(|_| anyhow::anyhow!("the fdatasync thread failed"))??;
        file.sync_all()?;
        let rate = mbps(total, start.elapsed().as_secs_f64());
        drop(file);
        std::fs::remove_file(&path)?;
        rate
    })
    .await?
}

/// CPU seconds per GiB the kernel spends putting `slices` into the page cache (a new
/// file, no fsync), on the writing thread. The cost of a page the file needs first is
/// part of it: where the hypervisor backs guest memory lazily and takes free pages back
/// (a balloon with free page reporting), a page fresh to the guest costs several times
/// the copy, and every server writing blobs through the page cache pays it per byte.
pub async fn page_cache_write_cpu(dir: &Path, slices: &[Bytes]) -> Result<f64> {
    let path = dir.join("limits-page-cache-write.bin");
    let slices = slices.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::create(&path)?;
        let before = Cpu::of("thread-self", false)?;
        let total = write_slices(&mut file, &slices)?;
        let spent = Cpu::of("thread-self", false)?.since(before).total();
        drop(file);
        std::fs::remove_file(&path)?;
        Ok(spent * GIB / total.max(1) as f64)
    })
    .await?
}

/// Read a file of `slices` twice and time the second read, in MB/s: reading from the page
/// cache, the best a server can do before the network.
pub async fn page_cache_read(dir: &Path, slices: &[Bytes]) -> Result<f64> {
    let path = dir.join("limits-read.bin");
    let slices = slices.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::create(&path)?;
        write_slices(&mut file, &slices)?;
        drop(file);
        let mut buf = vec![0u8; 1 << 20];
        let mut read_all = || -> Result<(u64, f64)> {
            let start = Instant::now();
            let mut file = std::fs::File::open(&path)?;
            let mut total = 0u64;
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            Ok((total, start.elapsed().as_secs_f64()))
        };
        read_all()?;
        let (total, secs) = read_all()?;
        std::fs::remove_file(&path)?;
        mbps(total, secs)
    })
    .await?
}

/// Single-stream loopback TCP throughput between a tokio sender and receiver, in MB/s.
pub async fn loopback_tcp(total: u64) -> Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let receiver = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            let n = socket.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        anyhow::Ok(got)
    });
    let buf = vec![7u8; 1 << 20];
    let start = Instant::now();
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    let mut sent = 0u64;
    while sent < total {
        socket.write_all(&buf).await?;
        sent += buf.len() as u64;
    }
    socket.shutdown().await?;
    drop(socket);
    let got = receiver.await??;
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(got == sent, "loopback received {got} of {sent} bytes");
    mbps(got, secs)
}

/// A bare loop sending a cached file of `slices` to a loopback receiver in another thread
/// the way layercache sends a blob: memory-mapped 2 MiB windows, each written to the
/// socket and unmapped. Its rate in MB/s, and the CPU seconds per GiB it spends on the
/// sending thread: what serving a file costs this machine without HTTP. On loopback the
/// sender also runs the receiving side's TCP processing, and a receiver on the other core
/// costs it about three times what one on its own core does (measured with `sendfile`:
/// 0.37-0.50 against 0.12-0.15 CPU-s/GiB on a 2-core VM); the scheduler is left to place
/// the two, as it places a server and its client.
pub async fn loopback_mapped(dir: &Path, slices: &[Bytes]) -> Result<(f64, f64)> {
    let path = dir.join("limits-mapped.bin");
    let slices = slices.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::create(&path)?;
        let total = write_slices(&mut file, &slices)?;
        drop(file);
        let file = std::fs::File::open(&path)?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let receiver = std::thread::spawn(move || -> std::io::Result<u64> {
            let mut socket = std::net::TcpStream::connect(addr)?;
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0u64;
            loop {
                match socket.read(&mut buf)? {
                    0 => return Ok(got),
                    n => got += n as u64,
                }
            }
        });
        let (mut socket, _) = listener.accept()?;
        let (start, before) = (Instant::now(), Cpu::of("thread-self", false)?);
        let mut sent = 0u64;
        while sent < total {
            let len = (total - sent).min(WINDOW);
            socket.write_all(&map_window(&file, sent, len)?)?;
            sent += len;
        }
        let spent = Cpu::of("thread-self", false)?.since(before).total();
        drop(socket);
        let secs = start.elapsed().as_secs_f64();
        let got = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("the receiving thread failed"))??;
        std::fs::remove_file(&path)?;
        anyhow::ensure!(got == total, "loopback received {got} of {total} bytes");
        Ok((mbps(total, secs)?, spent * GIB / total as f64))
    })
    .await?
}

/// The windows [`loopback_mapped`] sends, as layercache's file backend maps them.
const WINDOW: u64 = 2 << 20;

/// `len` bytes of `file` from `offset`, mapped read-only.
#[allow(unsafe_code)]
fn map_window(file: &std::fs::File, offset: u64, len: u64) -> Result<memmap2::Mmap> {
    // SAFETY: the file is the loop's own, and nothing truncates or writes it while mapped.
    let window = unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(usize::try_from(len)?)
            .map(file)?
    };
    Ok(window)
}

/// What the benchmark's pulls reach ([`loadgen::get_discarding`]) against a trivial
/// in-process server that answers one `GET` with `total` bytes from memory, in MB/s: the
/// ceiling of the pull figures, to show the client is not what limits them.
pub async fn http_get_ceiling(total: u64) -> Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        read_head(&mut socket).await?;
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\n\r\n");
        socket.write_all(head.as_bytes()).await?;
        let buf = vec![7u8; 1 << 20];
        let mut sent = 0u64;
        while sent < total {
            let n = (total - sent).min(buf.len() as u64) as usize;
            socket.write_all(buf.get(..n).unwrap_or(&buf)).await?;
            sent += n as u64;
        }
        anyhow::Ok(())
    });
    let start = Instant::now();
    let target = loadgen::Target {
        authority: addr.to_string(),
        authorization: None,
    };
    let got = loadgen::get_discarding(&target, "/").await?;
    let secs = start.elapsed().as_secs_f64();
    server.await??;
    anyhow::ensure!(got == total, "received {got} of {total} bytes");
    mbps(got, secs)
}

/// What the benchmark's own HTTP client reaches sending `slices` as one streamed `PUT`
/// to a trivial in-process server that discards the body, in MB/s: the ceiling of the
/// push figures.
pub async fn http_put_ceiling(client: &reqwest::Client, slices: &[Bytes]) -> Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let total: u64 = slices.iter().map(|s| s.len() as u64).sum();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        let mut got = read_head(&mut socket).await?;
        let mut buf = vec![0u8; 1 << 20];
        while got < total {
            let n = socket.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "client closed after {got} of {total} bytes");
            got += n as u64;
        }
        socket
            .write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
            .await?;
        anyhow::Ok(())
    });
    let owned: Vec<Bytes> = slices.to_vec();
    let body = reqwest::Body::wrap_stream(futures::stream::iter(
        owned.into_iter().map(Ok::<Bytes, std::convert::Infallible>),
    ));
    let start = Instant::now();
    client
        .put(format!("http://{addr}/"))
        .header(reqwest::header::CONTENT_LENGTH, total)
        .body(body)
        .send()
        .await?
        .error_for_status()?;
    let secs = start.elapsed().as_secs_f64();
    server.await??;
    mbps(total, secs)
}

/// Read a request head up to its blank line; returns how many body bytes came with it.
async fn read_head(socket: &mut tokio::net::TcpStream) -> Result<u64> {
    let mut head = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = socket.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "connection closed before the request head ended");
        head.extend_from_slice(buf.get(..n).unwrap_or_default());
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok((head.len() - end - 4) as u64);
        }
    }
}

/// `bytes` over `secs`, in MB/s.
pub fn mbps(bytes: u64, secs: f64) -> Result<f64> {
    (secs > 0.0)
        .then(|| bytes as f64 / MB / secs)
        .context("zero elapsed time")
}

/// Measure each machine limit `rounds` times.
pub async fn measure(dir: &Path, base: &Base, rounds: usize) -> Result<Limits> {
    let gib = base.slices().get(..1024).unwrap_or(base.slices());
    let client = registry::http_client()?;
    let (mut sha, mut read, mut write, mut overlapped, mut tcp, mut get, mut put) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut page_cache_cpu, mut reused_cpu) = (vec![], vec![]);
    let (mut mapped, mut mapped_cpu) = (vec![], vec![]);
    for round in 0..rounds {
        eprintln!("bench: machine limits, round {}", round + 1);
        sha.push(sha256_one_core(gib).await?);
        crate::settle();
        page_cache_cpu.push(page_cache_write_cpu(dir, gib).await?);
        // At once, into the pages that file held: what a write costs the guest itself.
        reused_cpu.push(page_cache_write_cpu(dir, gib).await?);
        crate::settle();
        write.push(disk_write_fsync(dir, gib).await?);
        crate::settle();
        overlapped.push(disk_write_fsync_overlapped(dir, gib).await?);
        read.push(page_cache_read(dir, gib).await?);
        let (rate, cpu) = loopback_mapped(dir, gib).await?;
        mapped.push(rate);
        mapped_cpu.push(cpu);
        tcp.push(loopback_tcp(4 << 30).await?);
        get.push(http_get_ceiling(4 << 30).await?);
        put.push(http_put_ceiling(&client, gib).await?);
    }
    Ok(Limits {
        sha256_one_core: Summary::of(&sha),
        page_cache_read: Summary::of(&read),
        page_cache_write_cpu: Summary::of(&page_cache_cpu),
        page_cache_rewrite_cpu: Summary::of(&reused_cpu),
        loopback_mapped: Summary::of(&mapped),
        loopback_mapped_cpu: Summary::of(&mapped_cpu),
        disk_write_fsync: Summary::of(&write),
        disk_write_fsync_overlapped: Summary::of(&overlapped),
        loopback_tcp: Summary::of(&tcp),
        http_get_ceiling: Summary::of(&get),
        http_put_ceiling: Summary::of(&put),
        ..Limits::default()
    })
}

/// Write every slice to `file`; returns the bytes written.
fn write_slices(file: &mut std::fs::File, slices: &[Bytes]) -> std::io::Result<u64> {
    let mut total = 0u64;
    for s in slices {
        file.write_all(s)?;
        total += s.len() as u64;
    }
    Ok(total)
}
