//! Work split between the calling thread and rayon's workers that never waits for a worker
//! still asleep: the caller claims tasks itself, and returns as soon as every task is done
//! and no worker is inside one.
//!
//! Why not `par_iter`: called from outside the pool, rayon injects the job, blocks the
//! caller on a latch and wakes sleeping workers, which on this project's 2-vCPU VM costs
//! ~150 µs per call once the workers have slept (a throwaway program timing 50 µs of work
//! 80 µs apart: 210 µs with `par_iter`, 131 µs on one thread, 131 µs here; 300 µs of work:
//! 405 / 433 / 305 µs). Here a helper that arrives late finds the tasks taken and leaves;
//! the caller never sleeps. Which thread runs which task does not change any result: tasks
//! write disjoint outputs.
//!
//! A whole forward pass runs inside a [`session`]: its helpers stay awake between the
//! pass's parallel calls (spinning, and running any other rayon work that is pending), so a
//! call ~100 µs after the previous one still finds them, as ONNX Runtime's spinning
//! intra-op pool does.

use std::cell::{RefCell, UnsafeCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

type Payload = Box<dyn std::any::Any + Send>;
type Job = dyn Fn(usize) + Sync;

/// What the caller and its helpers share. `job` borrows from the caller's frame; it is a raw
/// pointer because a helper may wake after the caller returned, and then only touches the
/// counters (see [`Control::work`]).
struct Control {
    tasks: usize,
    next: AtomicUsize,
    closed: AtomicBool,
    running: AtomicUsize,
    panic: Mutex<Option<Payload>>,
    job: *const Job,
}

// SAFETY: `job` is dereferenced only while the caller's frame is alive (the protocol in
// `work` and `run`), and the job is `Sync`.
unsafe impl Send for Control {}
// SAFETY: as above.
unsafe impl Sync for Control {}

impl Control {
    /// Claims and runs tasks until none are left or the run is closed.
    fn work(&self) {
        loop {
            // Counted as running *before* reading `closed`: with sequentially consistent
            // operations, either the caller's final read of `running` sees this increment (and
            // waits for it), or this read of `closed` sees the caller's store (and stops).
            self.running.fetch_add(1, SeqCst);
            let _leave = Leave(&self.running);
            if self.closed.load(SeqCst) {
                return;
            }
            let i = self.next.fetch_add(1, SeqCst);
            if i >= self.tasks {
                return;
            }
            // SAFETY: this thread is counted in `running` and saw `closed` false, so the
            // caller is still inside `run`, waiting, and `job` points into its frame.
            let job = unsafe { &*self.job };
            if let Err(p) = panic::catch_unwind(AssertUnwindSafe(|| job(i))) {
                if let Ok(mut slot) = self.panic.lock() {
                    slot.get_or_insert(p);
                }
                self.closed.store(true, SeqCst);
            }
        }
    }
}

struct Leave<'a>(&'a AtomicUsize);
impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// Closes the run and waits until no helper is inside a task; runs on unwinding too, so the
/// caller's frame outlives every use of it.
struct Close<'a>(&'a Control);
impl Drop for Close<'_> {
    fn drop(&mut self) {
        self.0.closed.store(true, SeqCst);
        let mut spins = 0u32;
        while self.0.running.load(SeqCst) != 0 {
            spins = spins.saturating_add(1);
            if spins < 1 << 12 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// Items handed out by index, each to exactly one thread.
struct Slots<T>(Vec<UnsafeCell<Option<T>>>);
// SAFETY: `Control::work` hands out every index once (`fetch_add`), so no two threads touch
// one slot; `T: Send` lets the item move to the thread that takes it.
unsafe impl<T: Send> Sync for Slots<T> {}

impl<T> Slots<T> {
    /// # Safety
    /// No other thread takes slot `i` (it was claimed once).
    unsafe fn take(&self, i: usize) -> Option<T> {
        // SAFETY: forwarded; the index is in bounds or `get` fails.
        self.0.get(i).and_then(|c| unsafe { (*c.get()).take() })
    }
}

/// Where a [`session`]'s owner posts its runs and its helpers pick them up.
struct Board {
    open: AtomicBool,
    /// Whether the helpers were started (at the session's first parallel call: a pass
    /// without one never has a core spinning beside it).
    started: AtomicBool,
    helpers: usize,
    /// Bumped for each posted run.
    posted: AtomicUsize,
    current: Mutex<Option<Arc<Control>>>,
}

thread_local! {
    /// The session this thread owns, if any.
    static BOARD: RefCell<Option<Arc<Board>>> = const { RefCell::new(None) };
}

impl Board {
    /// Starts the helpers unless they were started.
    fn start(self: &Arc<Self>) {
        if !self.started.swap(true, SeqCst) {
            for _ in 0..self.helpers {
                let b = Arc::clone(self);
                rayon::spawn(move || b.help());
            }
        }
    }

    /// A helper's loop: joins each posted run until the session ends. Between runs it
    /// executes whatever rayon work is pending (so a `par_iter` injected from outside the
    /// pool cannot wait on a worker that only spins), and otherwise spins.
    fn help(&self) {
        let mut seen = 0;
        while self.open.load(SeqCst) {
            let posted = self.posted.load(SeqCst);
            if posted != seen {
                seen = posted;
                let run = self.current.lock().ok().and_then(|c| c.clone());
                if let Some(control) = run {
                    control.work();
                }
            } else if !matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
                // Looking for rayon work touches shared deques; between looks, `pause`
                // leaves the core's resources to an SMT sibling.
                for _ in 0..32 {
                    if self.posted.load(SeqCst) != seen {
                        break;
                    }
                    std::hint::spin_loop();
                }
            }
        }
    }
}

/// Ends a session, on unwinding too.
struct EndSession(Arc<Board>);
impl Drop for EndSession {
    fn drop(&mut self) {
        self.0.open.store(false, SeqCst);
        BOARD.with(|b| b.borrow_mut().take());
    }
}

/// Below this many multiply-accumulates a pass starts its helpers at its first parallel
/// call instead of at once: a small pass may have none (and then no core spins beside
/// it), while a large one loses more to helpers woken late — LeNet-5 at batch 64 on two
/// threads ran in 0.77 of the time with helpers started at once.
pub(crate) const SESSION_EAGER_MIN_MACS: u64 = 1 << 22;

/// Runs `pass`, which does about `macs` multiply-accumulates, with
/// `rayon::current_num_threads() - 1` helpers held awake for its [`for_each`] calls on this
/// thread: from the start when `macs ≥` [`SESSION_EAGER_MIN_MACS`], else from the first
/// such call on (the helpers spin, so the other cores are busy until `pass` returns).
/// Nested sessions and one-thread pools just run `pass`.
pub(crate) fn session<R>(macs: u64, pass: impl FnOnce() -> R) -> R {
    let threads = rayon::current_num_threads();
    if threads < 2 || BOARD.with(|b| b.borrow().is_some()) {
        return pass();
    }
    let board = Arc::new(Board {
        open: AtomicBool::new(true),
        started: AtomicBool::new(false),
        helpers: threads - 1,
        posted: AtomicUsize::new(0),
        current: Mutex::new(None),
    });
    BOARD.with(|b| *b.borrow_mut() = Some(Arc::clone(&board)));
    if macs >= SESSION_EAGER_MIN_MACS {
        board.start();
    }
    let _end = EndSession(board);
    pass()
}

/// [`for_each`] for fallible tasks: the first error any task returns (the others still run
/// to completion or to their own error).
///
/// # Errors
/// The first error reported, in whatever order the threads finished.
pub(crate) fn try_for_each<T: Send>(
    items: Vec<T>,
    task: &(dyn Fn(T) -> crate::Result<()> + Sync),
) -> crate::Result<()> {
    let failure = Mutex::new(None);
    for_each(items, &|item| {
        if let Err(e) = task(item) {
            if let Ok(mut f) = failure.lock() {
                f.get_or_insert(e);
            }
        }
    });
    match failure.into_inner() {
        Ok(Some(e)) => Err(e),
        _ => Ok(()),
    }
}

/// Runs `task` on every item exactly once, on the calling thread and as many rayon workers as
/// make up `rayon::current_num_threads()` threads with it (which thread runs which item is
/// unspecified). A panic in a task is resumed on the caller after every helper has left.
pub(crate) fn for_each<T: Send>(items: Vec<T>, task: &(dyn Fn(T) + Sync)) {
    let helpers = rayon::current_num_threads()
        .saturating_sub(1)
        .min(items.len().saturating_sub(1));
    if helpers == 0 {
        items.into_iter().for_each(task);
        return;
    }
    let tasks = items.len();
    let slots = Slots(
        items
            .into_iter()
            .map(|t| UnsafeCell::new(Some(t)))
            .collect(),
    );
    let job = |i: usize| {
        // SAFETY: index `i` was claimed once (see `Slots`).
        if let Some(item) = unsafe { slots.take(i) } {
            task(item);
        }
    };
    let job: &(dyn Fn(usize) + Sync + '_) = &job;
    // SAFETY: only the lifetime is erased. `Close` keeps this frame (and so `job`, `slots`
    // and `task`) alive until no helper can dereference the pointer any more.
    let job: *const Job =
        unsafe { std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const Job>(job) };
    let control = Arc::new(Control {
        tasks,
        next: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        running: AtomicUsize::new(0),
        panic: Mutex::new(None),
        job,
    });
    {
        let close = Close(&control);
        let board = BOARD.with(|b| b.borrow().clone());
        match board {
            Some(board) => {
                if let Ok(mut current) = board.current.lock() {
                    *current = Some(Arc::clone(&control));
                }
                board.posted.fetch_add(1, SeqCst);
                board.start();
            }
            None => {
                for _ in 0..helpers {
                    let c = Arc::clone(&control);
                    rayon::spawn(move || c.work());
                }
            }
        }
        close.0.work();
    }
    if let Some(p) = control.panic.lock().ok().and_then(|mut p| p.take()) {
        panic::resume_unwind(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_once_on_any_pool() {
        for threads in [1, 2, 3, 5] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for n in [0usize, 1, 2, 7, 100] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                // From outside the pool (the caller is no worker) and from inside it.
                pool.install(|| {
                    for_each((0..n).collect(), &|i: usize| {
                        hits[i].fetch_add(1, SeqCst);
                    })
                });
                let outside = || {
                    for_each((0..n).collect(), &|i: usize| {
                        hits[i].fetch_add(1, SeqCst);
                    })
                };
                pool.install(|| {
                    std::thread::scope(|s| {
                        s.spawn(outside);
                    })
                });
                assert!(
                    hits.iter().all(|h| h.load(SeqCst) == 2),
                    "{threads} threads, {n} items"
                );
            }
        }
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_after_the_helpers_left() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let done = AtomicUsize::new(0);
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            pool.install(|| {
                for_each((0..64).collect(), &|i: usize| {
                    if i == 5 {
                        panic!("task 5");
                    }
                    done.fetch_add(1, SeqCst);
                })
            })
        }));
        assert!(result.is_err());
        assert!(done.load(SeqCst) < 64);
    }

    #[test]
    fn sessions_run_every_item_once_and_keep_rayon_work_moving() {
        use rayon::prelude::*;
        // Helpers started lazily (a small pass) and at once (a large one).
        for (threads, macs) in [(1, 0), (2, 0), (3, 0), (2, u64::MAX), (3, u64::MAX)] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let hits: Vec<AtomicUsize> = (0..50).map(|_| AtomicUsize::new(0)).collect();
            let sum = pool.install(|| {
                session(macs, || {
                    for _ in 0..3 {
                        for_each((0..50).collect(), &|i: usize| {
                            hits[i].fetch_add(1, SeqCst);
                        });
                    }
                    // A nested session is the same session.
                    session(0, || {
                        for_each((0..50).collect(), &|i: usize| {
                            hits[i].fetch_add(1, SeqCst);
                        })
                    });
                    // The owner blocks outside rayon while a thread from outside the pool
                    // injects work: only a helper that runs pending work instead of merely
                    // spinning lets that finish (a one-thread pool has no one else to run
                    // it, session or not).
                    if threads == 1 {
                        return 999 * 1000 / 2;
                    }
                    std::thread::scope(|s| {
                        s.spawn(|| pool.install(|| (0..1000u64).into_par_iter().sum::<u64>()))
                            .join()
                            .unwrap()
                    })
                })
            });
            assert_eq!(sum, 999 * 1000 / 2);
            assert!(
                hits.iter().all(|h| h.load(SeqCst) == 4),
                "{threads} threads"
            );
            // The session is over: the helpers left, so the pool still runs new work.
            assert_eq!(pool.install(|| (0..10u64).into_par_iter().sum::<u64>()), 45);
        }
    }

    #[test]
    fn a_panic_ends_the_session() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            pool.install(|| session(u64::MAX, || panic!("inside the pass")))
        }));
        assert!(result.is_err());
        assert!(pool.install(|| BOARD.with(|b| b.borrow().is_none())));
        let after = pool.install(|| {
            use rayon::prelude::*;
            (0..10u64).into_par_iter().sum::<u64>()
        });
        assert_eq!(after, 45);
    }
}
