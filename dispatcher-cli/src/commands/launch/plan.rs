//! How many workers to submit: a pure function of the job's backlog (from
//! the server's `/status`) and of the workers `launch` has, unit-tested
//! without a server or a cluster.

use dispatcher_core::protocol::StatusResponse;

/// Lines per worker assumed until a worker has shown how many it takes:
/// the workers' default `--max-in-flight`.
pub const DEFAULT_CAPACITY: u64 = 64;

/// Lines one worker started by `command` holds at once, as its command
/// says: its `--max-in-flight N` (or its alias `--workers`), else the
/// workers' default, [`DEFAULT_CAPACITY`]. What workers are then seen to
/// hold can only raise it (a task's requests per line, a batch prefetched).
pub fn stated_capacity(command: &[String]) -> u64 {
    let mut capacity = None;
    let mut words = command.iter();
    while let Some(word) = words.next() {
        let value = match word.split_once('=') {
            Some(("--max-in-flight" | "--workers", value)) => Some(value.to_string()),
            None if word == "--max-in-flight" || word == "--workers" => words.next().cloned(),
            _ => None,
        };
        if let Some(n) = value.and_then(|v| v.parse::<u64>().ok()).filter(|n| *n > 0) {
            capacity = Some(n);
        }
    }
    capacity.unwrap_or(DEFAULT_CAPACITY)
}

/// What is left of the job, as the server sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Every input line has its output line.
    pub complete: bool,
    /// Lines not handed out yet (unread, or queued for reissue); `None`
    /// while the server is still counting the input and some is unread.
    pub unissued: Option<u64>,
    /// Lines in flight with workers.
    pub in_flight: u64,
}

impl Backlog {
    /// The backlog in a `/status` answer.
    pub fn of(status: &StatusResponse) -> Backlog {
        let unread = match status.lines_total {
            Some(total) => Some(total.saturating_sub(status.next_work_id)),
            None if status.input_bytes_consumed >= status.input_bytes_total => Some(0),
            None => None,
        };
        // Lines read ahead for grouping are past `next_work_id` but unissued.
        let waiting = status.groups.map_or(0, |g| g.waiting);
        Backlog {
            complete: status.complete,
            unissued: unread.map(|n| n + status.queued_for_reissue + waiting),
            in_flight: status.in_flight,
        }
    }

    /// No line is left to hand out: whatever remains is in flight.
    pub fn drained(&self) -> bool {
        self.unissued == Some(0)
    }
}

/// The workers `launch` has now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fleet {
    /// Jobs submitted and not ended: pending or running.
    pub alive: u32,
    /// `--max-workers`.
    pub max: u32,
    /// Lines one worker holds at once: the most any worker has held so far
    /// ([`DEFAULT_CAPACITY`] before any did).
    pub capacity: u64,
}

/// How many workers to submit now.
///
/// Up to `--max-workers` while lines are left to hand out; none once the
/// lines left fit in the workers there are (their free places: each alive
/// worker takes `capacity` lines, less what is in flight). A worker that
/// ends early is replaced by this same rule, since it no longer counts as
/// alive. With nothing unissued no worker is submitted, even when none is
/// alive: the lines in flight belong to workers still at work, or come back
/// (lease expiry, release) as unissued lines, which then get a worker.
pub fn to_submit(backlog: Backlog, fleet: Fleet) -> u32 {
    if backlog.complete {
        return 0;
    }
    let room = fleet.max.saturating_sub(fleet.alive);
    let capacity = fleet.capacity.max(1);
    let free = (u64::from(fleet.alive) * capacity).saturating_sub(backlog.in_flight);
    let wanted = match backlog.unissued {
        None => u64::from(room),
        Some(unissued) => unissued.saturating_sub(free).div_ceil(capacity),
    };
    u32::try_from(wanted).unwrap_or(u32::MAX).min(room)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_holds_what_its_command_says() {
        let words = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert_eq!(
            stated_capacity(&words("dispatcher infer --engine echo")),
            64
        );
        assert_eq!(stated_capacity(&words("infer --max-in-flight 2")), 2);
        assert_eq!(stated_capacity(&words("infer --max-in-flight=8 -q")), 8);
        assert_eq!(stated_capacity(&words("./my-task --workers 16")), 16);
        assert_eq!(stated_capacity(&words("infer --max-in-flight")), 64);
        // 20 lines, workers of 2: --max-workers 2 runs both.
        let fleet = Fleet {
            alive: 0,
            max: 2,
            capacity: 2,
        };
        assert_eq!(to_submit(backlog(Some(20), 0), fleet), 2);
        // 500 lines, workers of 8, up to 16: all 16.
        let fleet = Fleet {
            alive: 0,
            max: 16,
            capacity: 8,
        };
        assert_eq!(to_submit(backlog(Some(500), 0), fleet), 16);
    }

    fn backlog(unissued: Option<u64>, in_flight: u64) -> Backlog {
        Backlog {
            complete: false,
            unissued,
            in_flight,
        }
    }

    fn fleet(alive: u32, max: u32) -> Fleet {
        Fleet {
            alive,
            max,
            capacity: 64,
        }
    }

    #[test]
    fn a_fresh_job_gets_up_to_max_workers() {
        // Still counting the input: as many as allowed.
        assert_eq!(to_submit(backlog(None, 0), fleet(0, 3)), 3);
        assert_eq!(to_submit(backlog(Some(600), 0), fleet(0, 3)), 3);
        // 100 lines fill two workers of 64, not three.
        assert_eq!(to_submit(backlog(Some(100), 0), fleet(0, 3)), 2);
        assert_eq!(to_submit(backlog(Some(600), 0), fleet(3, 3)), 0);
        assert_eq!(to_submit(backlog(Some(600), 0), fleet(5, 3)), 0);
    }

    #[test]
    fn an_ended_worker_is_replaced_while_lines_are_left() {
        // Three ran; one ended with 300 lines still unissued.
        assert_eq!(to_submit(backlog(Some(300), 128), fleet(2, 3)), 1);
        // Its lines came back after the job had drained: a worker for them.
        assert_eq!(to_submit(backlog(Some(5), 0), fleet(0, 3)), 1);
    }

    #[test]
    fn at_the_tail_no_worker_is_submitted_for_lines_that_fit() {
        // 40 unissued lines, two workers with 100 of 128 places taken: the 28
        // free places leave 12 lines, worth one more worker.
        assert_eq!(to_submit(backlog(Some(40), 100), fleet(2, 3)), 1);
        // 20 unissued lines fit in the 28 free places.
        assert_eq!(to_submit(backlog(Some(20), 100), fleet(2, 3)), 0);
        // Nothing unissued, lines in flight, no worker alive: they come back
        // as unissued lines (and get a worker then); none is started to wait.
        assert_eq!(to_submit(backlog(Some(0), 5), fleet(0, 3)), 0);
        let done = Backlog {
            complete: true,
            ..backlog(Some(0), 0)
        };
        assert_eq!(to_submit(done, fleet(0, 3)), 0);
    }

    #[test]
    fn the_backlog_is_read_from_status() {
        let mut status: StatusResponse = serde_json::from_value(serde_json::json!({
            "last_processed_work_id": 9, "next_work_id": 50, "issued": 30,
            "pending": 0, "heap_size": 30, "expired_reissues": 0, "lines_done": 10,
            "lines_total": null, "input_bytes_consumed": 500, "input_bytes_total": 6000,
            "in_flight": 30, "queued_for_reissue": 10, "reorder_buffer": 0,
            "reorder_buffer_bytes": 0, "reissues": {"timeout": 0, "release": 10, "retry": 0},
            "tombstones": 0, "invalid_lines": 0, "ignored_results": 0,
            "oldest_in_flight": null, "work_timeout_secs": 1200.0, "max_retries": 3,
            "complete": false, "uptime_secs": 3.0
        }))
        .unwrap();
        assert_eq!(Backlog::of(&status).unissued, None, "still counting");
        status.lines_total = Some(600);
        let b = Backlog::of(&status);
        assert_eq!(
            (b.unissued, b.in_flight, b.drained()),
            (Some(560), 30, false)
        );
        status.lines_total = None;
        status.input_bytes_consumed = 6000;
        status.queued_for_reissue = 0;
        assert!(
            Backlog::of(&status).drained(),
            "read to the end, none queued"
        );
    }
}
