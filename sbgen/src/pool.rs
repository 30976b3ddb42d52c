//! The one work pool: independent items run on scoped threads that take the next index from an
//! atomic counter. [`map`] returns every result in input order; [`stream`] hands results to a sink
//! in input order as soon as an item and all before it are done (so output can be printed while
//! later items still run), and stops taking new items when the sink fails.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};

/// The most threads a pool starts, whatever `-j` or `SBGEN_THREADS` say.
pub const MAX_THREADS: usize = 256;

/// Threads when no `-j` is given: `SBGEN_THREADS` when it is a positive number (at most
/// [`MAX_THREADS`]), else the core count.
pub fn default_threads() -> usize {
    threads_from(std::env::var("SBGEN_THREADS").ok().as_deref())
}

fn threads_from(var: Option<&str>) -> usize {
    var.and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .min(MAX_THREADS)
}

/// How many threads a pool of `threads` runs for `items` items (what `map` and `stream` start).
pub fn threads_for(threads: usize, items: usize) -> usize {
    threads.clamp(1, items.max(1))
}

/// `f` over every item on up to `threads` threads; the results in input order.
pub fn map<'a, T: Sync, R: Send>(items: &'a [T], threads: usize, f: impl Fn(&'a T) -> R + Sync) -> Vec<R> {
    let slots: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..threads_for(threads, items.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let value = f(item);
                *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
            });
        }
    });
    // A worker that panicked re-raised its panic when the scope ended, so every slot is filled.
    slots.into_iter().filter_map(|s| s.into_inner().unwrap_or_else(|e| e.into_inner())).collect()
}

/// `f` over every item on up to `threads` threads, each result handed to `sink` (with its index)
/// in input order as soon as it and every earlier one are done. The first sink error stops the
/// run: no new item is started, and the error is returned once the running ones end.
pub fn stream<'a, T: Sync, R: Send, E>(
    items: &'a [T],
    threads: usize,
    f: impl Fn(&'a T) -> R + Sync,
    mut sink: impl FnMut(usize, R) -> Result<(), E>,
) -> Result<(), E> {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<(usize, R)>();
    std::thread::scope(|scope| {
        for _ in 0..threads_for(threads, items.len()) {
            let tx = tx.clone();
            let (next, stop, f) = (&next, &stop, &f);
            scope.spawn(move || loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                if tx.send((i, f(item))).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut pending: Vec<Option<R>> = items.iter().map(|_| None).collect();
        let mut delivered = 0;
        for (i, result) in rx.iter() {
            pending[i] = Some(result);
            while let Some(result) = pending.get_mut(delivered).and_then(Option::take) {
                if let Err(e) = sink(delivered, result) {
                    stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
                delivered += 1;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn map_returns_results_in_input_order() {
        let items: Vec<usize> = (0..50).collect();
        // Early items take longest, so they finish last.
        let out = map(&items, 7, |&i| {
            std::thread::sleep(Duration::from_micros(((50 - i) * 50) as u64));
            i * 2
        });
        assert_eq!(out, (0..50).map(|i| i * 2).collect::<Vec<_>>());
        assert!(map(&[] as &[u8], 4, |&x| x).is_empty());
        assert_eq!(map(&[3], 0, |&x| x + 1), vec![4], "0 threads still runs one");
    }

    #[test]
    fn stream_delivers_in_input_order() {
        let items: Vec<usize> = (0..30).collect();
        let mut seen = Vec::new();
        let r: Result<(), ()> = stream(
            &items,
            5,
            |&i| {
                std::thread::sleep(Duration::from_micros(((30 - i) * 100) as u64));
                i + 100
            },
            |i, v| {
                seen.push((i, v));
                Ok(())
            },
        );
        assert!(r.is_ok());
        assert_eq!(seen, (0..30).map(|i| (i, i + 100)).collect::<Vec<_>>());
    }

    #[test]
    fn stream_stops_on_the_first_sink_error() {
        let items: Vec<usize> = (0..1000).collect();
        let started = AtomicUsize::new(0);
        let mut delivered = Vec::new();
        let r = stream(
            &items,
            2,
            |&i| {
                started.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(200));
                i
            },
            |i, _| {
                delivered.push(i);
                if i == 3 {
                    Err(format!("sink failed at {i}"))
                } else {
                    Ok(())
                }
            },
        );
        assert_eq!(r.unwrap_err(), "sink failed at 3");
        assert_eq!(delivered, vec![0, 1, 2, 3], "nothing is delivered after the error");
        assert!(started.load(Ordering::Relaxed) < 1000, "the run went on after the sink failed");
    }

    #[test]
    fn threads_come_from_sbgen_threads_else_the_core_count() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(threads_from(Some("3")), 3);
        assert_eq!(threads_from(Some(" 12 ")), 12);
        assert_eq!(threads_from(Some("100000")), MAX_THREADS);
        assert_eq!((threads_for(256, 12), threads_for(4, 12), threads_for(8, 0)), (12, 4, 1));
        for bad in [None, Some(""), Some("0"), Some("-2"), Some("many")] {
            assert_eq!(threads_from(bad), cores, "{bad:?}");
        }
    }
}
