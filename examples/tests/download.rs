//! The downloader against a tiny HTTP server on 127.0.0.1: success (fetch, verify, cache, train
//! one small epoch), a corrupted file, a transfer cut short, a 404 and a server that never
//! answers. No internet access is needed: the server serves a small synthetic dataset whose
//! checksums the tests pin.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::SgdConfig;
use burn_sam_sample::SamConfig;
use burn_sam_sample_examples::download::Downloader;
use burn_sam_sample_examples::fashion::{read_idx, FashionBatcher, FashionMnist, FILES};
use burn_sam_sample_examples::model::{Cnn, CnnConfig};
use flate2::{write::GzEncoder, Compression};

/// How the server answers a request for one file.
#[derive(Clone)]
enum Answer {
    Serve(Vec<u8>),
    /// Announce the whole length, send only the first part, close.
    CutShort(Vec<u8>, usize),
    NotFound,
    /// Accept, read the request, never answer.
    Silent,
    /// No announced length; bytes until the client hangs up.
    Endless,
    /// No announced length; one byte every 20 ms until the client hangs up.
    Trickle,
}

struct Server {
    base_url: String,
    requests: Arc<AtomicUsize>,
}

fn serve(answers: HashMap<String, Answer>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base_url = format!("http://{}/data/", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            let answers = answers.clone();
            std::thread::spawn(move || answer(stream, &answers));
        }
    });
    Server { base_url, requests }
}

fn answer(mut stream: TcpStream, answers: &HashMap<String, Answer>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).map_or(true, |n| n == 0) || header == "\r\n" {
            break;
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let file = path.rsplit('/').next().unwrap_or("").to_string();
    let head = |len: usize| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/gzip\r\nConnection: close\r\n\r\n"
        )
    };
    match answers.get(&file).cloned().unwrap_or(Answer::NotFound) {
        Answer::Serve(bytes) => {
            let _ = stream.write_all(head(bytes.len()).as_bytes());
            let _ = stream.write_all(&bytes);
        }
        Answer::CutShort(bytes, sent) => {
            let _ = stream.write_all(head(bytes.len()).as_bytes());
            let _ = stream.write_all(&bytes[..sent]);
        }
        Answer::NotFound => {
            let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
        Answer::Silent => std::thread::sleep(Duration::from_secs(30)),
        endless @ (Answer::Endless | Answer::Trickle) => {
            let slow = matches!(endless, Answer::Trickle);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\nConnection: close\r\n\r\n");
            let chunk = vec![0x55u8; if slow { 1 } else { 64 * 1024 }];
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(30) && stream.write_all(&chunk).is_ok() {
                if slow {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

fn idx(dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        bytes.extend(d.to_be_bytes());
    }
    bytes.extend(payload);
    bytes
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// A small learnable dataset: class c has a bright horizontal band at rows 2c..2c+3.
fn synthetic(images: usize) -> (Vec<u8>, Vec<u8>) {
    let mut pixels = Vec::with_capacity(images * 784);
    let mut labels = Vec::with_capacity(images);
    for i in 0..images {
        let class = (i % 10) as u8;
        for row in 0..28 {
            for col in 0..28 {
                let band = row >= 2 * class as usize + 4 && row < 2 * class as usize + 7;
                pixels.push(if band { 200 } else { ((i * 7 + col) % 40) as u8 });
            }
        }
        labels.push(class);
    }
    (idx(&[images as u32, 28, 28], &pixels), idx(&[images as u32], &labels))
}

/// The four gzipped files, by request name, and the downloader's checksums for them.
fn dataset() -> (HashMap<String, Vec<u8>>, [String; 4]) {
    let (train_images, train_labels) = synthetic(320);
    let (test_images, test_labels) = synthetic(100);
    let raw = [train_images, train_labels, test_images, test_labels];
    let dir = tempfile::tempdir().unwrap();
    let mut files = HashMap::new();
    let mut sums: Vec<String> = Vec::new();
    for (name, bytes) in FILES.iter().zip(&raw) {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        sums.push(read_idx(&path, None).unwrap().sha256);
        files.insert(format!("{name}.gz"), gzip(bytes));
    }
    (files, sums.try_into().unwrap())
}

fn downloader(base_url: &str, checksums: [String; 4]) -> Downloader {
    Downloader {
        base_url: base_url.to_string(),
        checksums,
        timeout: Duration::from_millis(500),
        attempts: 2,
        backoff: Duration::from_millis(20),
        progress: false,
        max_bytes: 1 << 20,
        deadline: Duration::from_secs(5),
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|e| e.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn answers(files: &HashMap<String, Vec<u8>>) -> HashMap<String, Answer> {
    files.iter().map(|(k, v)| (k.clone(), Answer::Serve(v.clone()))).collect()
}

#[test]
fn fetched_data_is_verified_cached_and_trains() {
    let (files, sums) = dataset();
    let server = serve(answers(&files));
    let cache = tempfile::tempdir().unwrap();
    downloader(&server.base_url, sums.clone()).fetch(cache.path()).unwrap();
    let mut expected: Vec<String> = FILES.iter().map(|n| format!("{n}.gz")).collect();
    expected.sort();
    assert_eq!(entries(cache.path()), expected, "the four files, nothing else");
    let served = server.requests.load(Ordering::SeqCst);
    assert_eq!(served, 4);

    // A second fetch finds everything verified and asks for nothing.
    downloader(&server.base_url, sums.clone()).fetch(cache.path()).unwrap();
    assert_eq!(server.requests.load(Ordering::SeqCst), served);

    let checksums: [&str; 4] = [&sums[0], &sums[1], &sums[2], &sums[3]];
    let data = FashionMnist::read_dir(cache.path().to_path_buf(), Some(&checksums)).unwrap();
    assert_eq!((data.train.len(), data.test.len()), (320, 100));

    // One small epoch with vSAM-trend, then the test accuracy.
    let device = burn_sam_sample::backend::select(None).unwrap();
    let train_device = device.clone().autodiff();
    train_device.seed(0);
    let mut model: Cnn = CnnConfig::new().with_channels(4).with_hidden(16).init(&train_device);
    let mut optim = SamConfig::vsam_trend().init(SgdConfig::new().init()).unwrap();
    let loss = CrossEntropyLossConfig::new().init(&train_device);
    let items: Vec<_> = (0..data.train.len()).filter_map(|i| data.train.get(i).ok()).collect();
    for chunk in items.chunks(32) {
        let batch = FashionBatcher::plain().batch(chunk.to_vec(), &train_device);
        let (next, out) = optim
            .step(0.05, model, |m: &Cnn| (loss.forward(m.forward(batch.images.clone()), batch.targets.clone()), ()));
        model = next;
        assert!(out.loss.into_scalar::<f32>().is_finite());
    }
    let test: Vec<_> = (0..data.test.len()).filter_map(|i| data.test.get(i).ok()).collect();
    let batch = FashionBatcher::plain().batch(test, &device);
    let accuracy = burn_sam_sample_examples::evaluate(&model, &[batch]);
    assert!(accuracy.is_finite() && optim.telemetry().step == 10, "{accuracy}");
}

#[test]
fn a_corrupted_file_is_an_error_and_never_enters_the_cache() {
    let (files, sums) = dataset();
    let mut answers = answers(&files);
    let name = format!("{}.gz", FILES[1]);
    let mut bad = files[&name].clone();
    // Another valid gzip stream with different content.
    bad = gzip(&{
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bad.as_slice()), &mut raw).unwrap();
        raw[20] ^= 1;
        raw
    });
    answers.insert(name.clone(), Answer::Serve(bad));
    let server = serve(answers);
    let cache = tempfile::tempdir().unwrap();
    let err = downloader(&server.base_url, sums).fetch(cache.path()).unwrap_err().to_string();
    assert!(err.contains(&name) && err.contains("SHA-256"), "{err}");
    assert_eq!(entries(cache.path()), vec![format!("{}.gz", FILES[0])], "only the verified first file");
}

#[test]
fn a_transfer_cut_short_is_retried_then_reported_and_leaves_nothing() {
    let (files, sums) = dataset();
    let mut answers = answers(&files);
    let name = format!("{}.gz", FILES[0]);
    let whole = files[&name].clone();
    let half = whole.len() / 2;
    answers.insert(name.clone(), Answer::CutShort(whole, half));
    let server = serve(answers);
    let cache = tempfile::tempdir().unwrap();
    let err = downloader(&server.base_url, sums).fetch(cache.path()).unwrap_err().to_string();
    assert!(err.contains(&name) && err.contains("attempt 2 of 2"), "{err}");
    assert!(err.contains("--offline"), "the message says what to do offline: {err}");
    assert_eq!(server.requests.load(Ordering::SeqCst), 2, "one retry");
    assert!(entries(cache.path()).is_empty(), "{:?}", entries(cache.path()));
}

#[test]
fn a_404_is_reported_at_once() {
    let (files, sums) = dataset();
    let mut answers = answers(&files);
    answers.insert(format!("{}.gz", FILES[0]), Answer::NotFound);
    let server = serve(answers);
    let cache = tempfile::tempdir().unwrap();
    let err = downloader(&server.base_url, sums).fetch(cache.path()).unwrap_err().to_string();
    assert!(err.contains("404") && err.contains("attempt 1 of 2"), "{err}");
    assert_eq!(server.requests.load(Ordering::SeqCst), 1, "no retry for a 404");
    assert!(entries(cache.path()).is_empty());
}

#[test]
fn a_server_that_never_answers_times_out() {
    let (files, sums) = dataset();
    let mut answers = answers(&files);
    answers.insert(format!("{}.gz", FILES[0]), Answer::Silent);
    let server = serve(answers);
    let cache = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let err = downloader(&server.base_url, sums).fetch(cache.path()).unwrap_err().to_string();
    assert!(err.to_lowercase().contains("timeout") || err.to_lowercase().contains("timed out"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert!(entries(cache.path()).is_empty());
}

#[test]
fn a_body_longer_than_the_cap_is_cut_off_and_leaves_nothing() {
    let (files, sums) = dataset();
    let mut endless = answers(&files);
    endless.insert(format!("{}.gz", FILES[0]), Answer::Endless);
    let server = serve(endless);
    let cache = tempfile::tempdir().unwrap();
    let err = downloader(&server.base_url, sums.clone()).fetch(cache.path()).unwrap_err().to_string();
    assert!(err.contains("past the 1048576 bytes accepted") && err.contains("attempt 1 of 2"), "{err}");
    assert!(entries(cache.path()).is_empty(), "{:?}", entries(cache.path()));
    // A length announced above the cap is refused before the body is read.
    let server = serve(answers(&files));
    let mut small = downloader(&server.base_url, sums);
    small.max_bytes = 10;
    let err = small.fetch(cache.path()).unwrap_err().to_string();
    assert!(err.contains("bytes, more than the 10 accepted"), "{err}");
    assert!(entries(cache.path()).is_empty(), "{:?}", entries(cache.path()));
}

#[test]
fn a_transfer_past_its_deadline_is_stopped() {
    let (files, sums) = dataset();
    let mut answers = answers(&files);
    answers.insert(format!("{}.gz", FILES[0]), Answer::Trickle);
    let server = serve(answers);
    let cache = tempfile::tempdir().unwrap();
    let mut slow = downloader(&server.base_url, sums);
    slow.deadline = Duration::from_millis(400);
    let started = Instant::now();
    let err = slow.fetch(cache.path()).unwrap_err().to_string();
    assert!(err.contains("took longer than 400ms"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert!(entries(cache.path()).is_empty());
}
