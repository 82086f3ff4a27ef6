//! Store benchmarks: acknowledged (fsynced) ingest, batched and from concurrent single-record
//! writers (group commit), and range queries over a 50,000-record tensor.
//!
//! Run: `cargo bench --profile dev -p metainf-node --bench store` (see BENCHMARKS.md).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use metainf_node::store::{RecordQuery, Store};
use metainf_protocol::{Keypair, VerifiedRecord, fixtures};

const ORIGINS: u64 = 10;

/// `per_origin` records from each of `ORIGINS` origins, signed and verified, on two threads.
fn pool(per_origin: u64, seed: u8) -> Vec<VerifiedRecord> {
    let keys: Vec<Keypair> = (0..ORIGINS)
        .map(|i| {
            let mut b = [seed; 32];
            b[0] = i as u8;
            Keypair::ed25519_from_bytes(b).unwrap()
        })
        .collect();
    let make = |range: std::ops::Range<u64>| -> Vec<VerifiedRecord> {
        range
            .flat_map(|seq| {
                keys.iter().enumerate().map(move |(i, k)| {
                    fixtures::signed(k, seq, seq * 3 + i as u64)
                        .verify()
                        .unwrap()
                })
            })
            .collect()
    };
    let half = per_origin / 2 + 1;
    std::thread::scope(|s| {
        let a = s.spawn(|| make(1..half));
        let mut out = make(half..per_origin + 1);
        let mut first = a.join().unwrap();
        first.append(&mut out);
        first
    })
}

struct Ingest {
    pool: Vec<VerifiedRecord>,
    cursor: usize,
    dirs: Vec<tempfile::TempDir>,
    store: Option<Store>,
}

impl Ingest {
    fn new(pool: Vec<VerifiedRecord>) -> Self {
        Self {
            pool,
            cursor: usize::MAX,
            dirs: Vec::new(),
            store: None,
        }
    }

    /// The next `n` unused records, opening a fresh store when the pool is used up.
    fn take(&mut self, n: usize) -> (Store, Vec<VerifiedRecord>) {
        if self.cursor.saturating_add(n) > self.pool.len() {
            self.store = None;
            self.dirs.clear();
            let dir = tempfile::tempdir().unwrap();
            self.store = Some(Store::open(dir.path().join("s")).unwrap());
            self.dirs.push(dir);
            self.cursor = 0;
        }
        let batch = self.pool[self.cursor..self.cursor + n].to_vec();
        self.cursor += n;
        (self.store.clone().unwrap(), batch)
    }
}

fn ingest(c: &mut Criterion) {
    let mut ingest = Ingest::new(pool(10_000, 1));
    let mut group = c.benchmark_group("ingest");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3));
    for batch in [100usize, 1000, 10_000] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(
            BenchmarkId::new("batched_acknowledged", batch),
            &batch,
            |b, &n| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let (store, records) = ingest.take(n);
                        let start = Instant::now();
                        store.put(records).unwrap();
                        total += start.elapsed();
                    }
                    total
                })
            },
        );
    }
    for threads in [1usize, 8, 32] {
        group.throughput(Throughput::Elements(threads as u64 * 10));
        group.bench_with_input(
            BenchmarkId::new("single_record_puts_group_commit", threads),
            &threads,
            |b, &threads| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let (store, records) = ingest.take(threads * 10);
                        let start = Instant::now();
                        std::thread::scope(|s| {
                            for chunk in records.chunks(10) {
                                let store = store.clone();
                                s.spawn(move || {
                                    for r in chunk {
                                        store.put(vec![r.clone()]).unwrap();
                                    }
                                });
                            }
                        });
                        total += start.elapsed();
                    }
                    total
                })
            },
        );
    }
    group.finish();
}

fn queries(c: &mut Criterion) {
    let records = pool(5_000, 2);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s")).unwrap();
    for chunk in records.chunks(10_000) {
        store.put(chunk.to_vec()).unwrap();
    }
    store.flush().unwrap();
    let cell = records[0].cell();
    let origin = records[0].origin();
    let mut group = c.benchmark_group("query");
    group.sample_size(20);
    let cases = [
        ("all_50k", RecordQuery::default()),
        (
            "hardware",
            RecordQuery {
                hardware: Some(cell.hardware),
                ..Default::default()
            },
        ),
        (
            "one_cell",
            RecordQuery {
                hardware: Some(cell.hardware),
                model: Some(cell.model),
                workload: Some(cell.workload),
                method: Some(cell.method),
                limit: None,
            },
        ),
        (
            "workload_and_method_by_index",
            RecordQuery {
                workload: Some(cell.workload),
                method: Some(cell.method),
                ..Default::default()
            },
        ),
    ];
    for (name, q) in cases {
        let n = store.query(&q).unwrap().records.len() as u64;
        group.throughput(Throughput::Elements(n));
        group.bench_function(format!("{name}_{n}_records"), |b| {
            b.iter(|| store.query(&q).unwrap())
        });
    }
    group.throughput(Throughput::Elements(1000));
    group.bench_function("records_after_page_1000", |b| {
        b.iter(|| store.records_after(&origin, 2000, 1000).unwrap())
    });
    group.throughput(Throughput::Elements(ORIGINS));
    group.bench_function("version_vector", |b| {
        b.iter(|| store.version_vector().unwrap())
    });
    group.finish();
}

criterion_group!(benches, ingest, queries);
criterion_main!(benches);
