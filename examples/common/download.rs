//! Fetching Fashion-MNIST over HTTP(S): verified, atomic, with timeouts, retries and progress.
//!
//! Each file is downloaded to a temporary file next to its target, its decompressed idx content is
//! checked against a pinned SHA-256, and only then is it renamed into place: nothing unverified
//! and nothing half-written ever enters the cache. Proxies are taken from the environment
//! (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`).

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::fashion::{idx_sha256, DataError, FILES};

/// Where the dataset's authors publish the files.
pub const DEFAULT_BASE_URL: &str = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/";

/// The environment variable that replaces [`DEFAULT_BASE_URL`] (a mirror).
pub const BASE_URL_VAR: &str = "FASHION_MNIST_URL";

/// SHA-256 of each file's decompressed idx content, in [`FILES`] order. They hold for the
/// upstream files and for Debian's recompressed copies alike (computed with
/// `zcat FILE.gz | sha256sum` on the `dataset-fashion-mnist` package's files).
pub const FASHION_MNIST_SHA256: [&str; 4] = [
    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
];

/// How to fetch the four files.
#[derive(Clone, Debug)]
pub struct Downloader {
    /// URL the file names (`<name>.gz`) are appended to; ends with `/`.
    pub base_url: String,
    /// Expected SHA-256 of each decompressed file, in [`FILES`] order.
    pub checksums: [String; 4],
    /// Limit for connecting, and for each wait for the response or for more of the body.
    pub timeout: Duration,
    /// Attempts per file for transient failures (connection errors, timeouts, cut transfers,
    /// HTTP 408, 429 and 5xx).
    pub attempts: u32,
    /// Wait before the second attempt; doubled before each later one.
    pub backoff: Duration,
    /// Show a progress bar (bytes, rate, ETA) on a terminal, a plain line per file otherwise.
    pub progress: bool,
    /// Largest body accepted per file, in bytes (default 64 MiB; the largest of the four
    /// gzipped files has 26 MB): a longer body, or a longer announced length, is refused.
    pub max_bytes: u64,
    /// Longest time one attempt at one file may take, however steadily the bytes come
    /// (default 10 minutes).
    pub deadline: Duration,
}

impl Default for Downloader {
    fn default() -> Self {
        let base = std::env::var(BASE_URL_VAR).unwrap_or_else(|_| DEFAULT_BASE_URL.to_string());
        Self {
            base_url: if base.ends_with('/') { base } else { format!("{base}/") },
            checksums: FASHION_MNIST_SHA256.map(String::from),
            timeout: Duration::from_secs(30),
            attempts: 4,
            backoff: Duration::from_secs(1),
            progress: true,
            max_bytes: 64 << 20,
            deadline: Duration::from_secs(600),
        }
    }
}

/// Why one attempt failed, and whether another may succeed.
struct Failure {
    message: String,
    transient: bool,
}

impl Failure {
    fn transient(message: String) -> Self {
        Self { message, transient: true }
    }
    fn permanent(message: String) -> Self {
        Self { message, transient: false }
    }
}

impl Downloader {
    /// Fetches every file that `dir` does not yet hold in verified form; creates `dir`.
    pub fn fetch(&self, dir: &Path) -> Result<(), DataError> {
        std::fs::create_dir_all(dir).map_err(|e| DataError(format!("cannot create {}: {e}", dir.display())))?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(self.timeout))
            .timeout_recv_response(Some(self.timeout))
            .timeout_per_read(Some(self.timeout))
            .build()
            .into();
        for (name, checksum) in FILES.iter().zip(&self.checksums) {
            let target = dir.join(format!("{name}.gz"));
            remove_stale_parts(dir, name);
            if target.is_file() && idx_sha256(&target).is_ok_and(|sum| &sum == checksum) {
                continue;
            }
            let url = format!("{}{name}.gz", self.base_url);
            let part = dir.join(format!("{name}.gz.part-{}", std::process::id()));
            let result = self.fetch_one(&agent, &url, &part).and_then(|()| {
                let sum = idx_sha256(&part).map_err(|e| e.to_string())?;
                if &sum == checksum {
                    std::fs::rename(&part, &target).map_err(|e| format!("cannot move it to {}: {e}", target.display()))
                } else {
                    Err(format!(
                        "{url}: the SHA-256 of its idx content is {sum}, expected {checksum}: the file is damaged \
                         or not Fashion-MNIST; nothing was written to {}",
                        dir.display()
                    ))
                }
            });
            if let Err(message) = result {
                let _ = std::fs::remove_file(&part);
                return Err(DataError(message));
            }
        }
        Ok(())
    }

    /// Downloads `url` to `part`, retrying transient failures with exponential backoff.
    fn fetch_one(&self, agent: &ureq::Agent, url: &str, part: &Path) -> Result<(), String> {
        let mut wait = self.backoff;
        for attempt in 1..=self.attempts.max(1) {
            match self.attempt(agent, url, part) {
                Ok(()) => return Ok(()),
                Err(failure) if failure.transient && attempt < self.attempts => {
                    log::warn!(
                        "fetching {url} (attempt {attempt} of {}): {}; retrying in {wait:?}",
                        self.attempts,
                        failure.message
                    );
                    std::thread::sleep(wait);
                    wait = wait.saturating_mul(2);
                }
                Err(failure) => {
                    return Err(format!(
                        "could not fetch {url}: {} (attempt {attempt} of {}).\n{}",
                        failure.message,
                        self.attempts,
                        offline_hint()
                    ))
                }
            }
        }
        Err(format!("could not fetch {url}: no attempt was made"))
    }

    fn attempt(&self, agent: &ureq::Agent, url: &str, part: &Path) -> Result<(), Failure> {
        let mut response = agent.get(url).call().map_err(|err| match err {
            ureq::Error::StatusCode(code) => {
                let message = format!("the server answered HTTP {code}");
                if code == 408 || code == 429 || code >= 500 {
                    Failure::transient(message)
                } else {
                    Failure::permanent(message)
                }
            }
            other => Failure::transient(other.to_string()),
        })?;
        let expected = response.body().content_length();
        if let Some(length) = expected.filter(|&length| length > self.max_bytes) {
            return Err(Failure::permanent(format!(
                "the server announces {length} bytes, more than the {} accepted",
                self.max_bytes
            )));
        }
        let mut file = std::fs::File::create(part)
            .map_err(|e| Failure::permanent(format!("cannot write {}: {e}", part.display())))?;
        let bar = self.bar(url, expected);
        let started = Instant::now();
        let mut reader = response.body_mut().as_reader();
        let mut buffer = vec![0u8; 64 * 1024];
        let mut received = 0u64;
        loop {
            let n = reader
                .read(&mut buffer)
                .map_err(|e| Failure::transient(format!("the transfer broke off after {received} bytes: {e}")))?;
            if n == 0 {
                break;
            }
            file.write_all(&buffer[..n])
                .map_err(|e| Failure::permanent(format!("cannot write {}: {e}", part.display())))?;
            received += n as u64;
            if received > self.max_bytes {
                return Err(Failure::permanent(format!("the body goes on past the {} bytes accepted", self.max_bytes)));
            }
            if started.elapsed() > self.deadline {
                return Err(Failure::permanent(format!(
                    "the transfer took longer than {:?} ({received} bytes so far)",
                    self.deadline
                )));
            }
            if let Some(bar) = &bar {
                bar.set_position(received);
            }
        }
        file.sync_all().map_err(|e| Failure::permanent(format!("cannot write {}: {e}", part.display())))?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        if let Some(expected) = expected.filter(|&e| e != received) {
            return Err(Failure::transient(format!("the transfer ended after {received} of {expected} bytes")));
        }
        if self.progress && !std::io::stderr().is_terminal() {
            eprintln!("fetched {url}: {received} bytes in {:.1} s", started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    fn bar(&self, url: &str, length: Option<u64>) -> Option<ProgressBar> {
        if !(self.progress && std::io::stderr().is_terminal()) {
            return None;
        }
        let bar = ProgressBar::new(length.unwrap_or(0));
        let template = "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}";
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        bar.set_message(url.rsplit('/').next().unwrap_or(url).to_string());
        Some(bar)
    }
}

/// What to do on a machine without internet access.
pub fn offline_hint() -> String {
    format!(
        "Without internet access: install Debian's `dataset-fashion-mnist` package, or put the four files \
         ({}, gzipped or not) in a folder and pass `--data-dir <folder>` or set FASHION_MNIST_DIR; \
         `--offline` (or FASHION_MNIST_OFFLINE=1) turns fetching off; {BASE_URL_VAR} names a mirror.",
        FILES.join(", ")
    )
}

/// Removes temporary files that an interrupted fetch of `name` left in `dir`.
fn remove_stale_parts(dir: &Path, name: &str) {
    let prefix = format!("{name}.gz.part-");
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path: PathBuf = entry.path();
        if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix)) {
            let _ = std::fs::remove_file(path);
        }
    }
}
