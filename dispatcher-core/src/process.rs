//! Signals and liveness of the processes this crate and the CLI start (an
//! engine, `launch`'s server and local workers), each in a process group of
//! its own: the one place that calls kill(2).

/// Sends `sig` to the process group led by `pid` (a process started with
/// `process_group(0)`: the group holds only it and what it forked).
#[allow(unsafe_code)]
pub fn signal_group(pid: u32, sig: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(-pid, sig);
    }
}

/// Sends `sig` to the process `pid`.
#[allow(unsafe_code)]
pub fn signal(pid: u32, sig: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: as above.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// `/proc/<pid>/stat` after the command name: `state ppid pgrp ...` (the
/// name may hold spaces and parentheses).
fn stat_fields(pid: &str) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat[stat.rfind(')').map_or(0, |i| i + 1)..].to_string())
}

/// The state letter and process group of `/proc/<pid>/stat`.
fn stat(pid: &str) -> Option<(String, u32)> {
    let fields = stat_fields(pid)?;
    let mut fields = fields.split_whitespace();
    let state = fields.next()?.to_string();
    let group = fields.nth(1)?.parse::<u32>().ok()?;
    Some((state, group))
}

/// The place of `starttime` among the fields after the command name.
const STARTTIME: usize = 19;

/// When process `pid` started, in clock ticks since boot (`starttime` of
/// `/proc/<pid>/stat`). With its id, this names one process: a later one
/// given the same id (after the first ended) started later.
pub fn start_time(pid: u32) -> Option<u64> {
    stat_fields(&pid.to_string())?
        .split_whitespace()
        .nth(STARTTIME)?
        .parse()
        .ok()
}

/// Whether `pid` is the process that started at `started` (a
/// [`start_time`]), and has not ended (a zombie has, as for [`alive`]), from
/// one read of its stat. Without a start time to compare (a record older
/// than start times), any live process of that id counts.
pub fn running(pid: u32, started: Option<u64>) -> bool {
    let Some(fields) = stat_fields(&pid.to_string()) else {
        return false;
    };
    let mut fields = fields.split_whitespace();
    let live = fields
        .next()
        .is_some_and(|state| state != "Z" && state != "X");
    live && started
        .is_none_or(|s| fields.nth(STARTTIME - 1).and_then(|t| t.parse().ok()) == Some(s))
}

/// Whether `pid` is a process that has not ended. A zombie has ended (it
/// waits only for its parent to reap it), so it does not count; `/proc`
/// tells them apart where `kill(2)` does not.
pub fn alive(pid: u32) -> bool {
    stat(&pid.to_string()).is_some_and(|(state, _)| state != "Z" && state != "X")
}

/// Whether a process of the group `pgid` has not ended (zombies excluded).
pub fn group_running(pgid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        name.bytes().all(|b| b.is_ascii_digit())
            && stat(&name).is_some_and(|(state, group)| state != "Z" && group == pgid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_told_from_another_of_the_same_id_by_its_start_time() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let started = start_time(pid).expect("a running process has a start time");
        assert!(running(pid, Some(started)));
        assert!(running(pid, None));
        // The same id, another start: a process that reused the id.
        assert!(!running(pid, Some(started + 1)));
        // This process started before its child.
        assert!(start_time(std::process::id()).unwrap() <= started);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!running(pid, Some(started)));
    }

    #[test]
    fn a_reaped_child_is_gone_and_a_zombie_is_not_alive() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(alive(pid));
        signal(pid, libc::SIGKILL);
        // Not reaped yet: a zombie, which has ended.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            !alive(pid),
            "a killed child is not alive before it is reaped"
        );
        child.wait().unwrap();
        assert!(!alive(pid));
    }
}
