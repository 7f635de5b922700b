//! Reading processes from /proc: one process's stat fields and a process tree. Used by
//! the measurements (CPU of a proxy's tree) and by the proxies (stopping a tree).

/// Fields of /proc/PID/stat after the command name: index 0 is the state, 1 the ppid,
/// 11 utime, 12 stime, 13 cutime, 14 cstime.
pub fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// All descendants of `pids` (found through /proc), children first.
pub fn descendants(pids: &[u32]) -> Vec<u32> {
    let mut parent = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(ppid) =
            stat_fields(pid).and_then(|f| f.get(1).and_then(|p| p.parse::<u32>().ok()))
        {
            parent.push((pid, ppid));
        }
    }
    let mut found: Vec<u32> = Vec::new();
    let mut frontier: Vec<u32> = pids.to_vec();
    while let Some(p) = frontier.pop() {
        for &(child, ppid) in &parent {
            if ppid == p && !found.contains(&child) && !pids.contains(&child) {
                found.push(child);
                frontier.push(child);
            }
        }
    }
    found
}
