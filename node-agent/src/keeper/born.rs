//! Starting a process born in its cgroup: `clone3(CLONE_INTO_CGROUP)`.
//!
//! Why not fork and then join: writing a pid to `cgroup.procs` takes the
//! kernel's global `cgroup_threadgroup_rwsem` for writing, which waits for
//! an RCU grace period unless another migration happened within the last
//! one. Measured here (strace of the keeper, kernel 6.18): that one write
//! took 11–14 ms of a 30 ms `testbusctl run -- true`, and every fork and
//! exit on the machine waits behind it meanwhile. A child created straight
//! into its cgroup takes that lock only for reading, as every fork does.
//!
//! What the child does between clone and exec is what std's `Command`
//! would do for the keeper's settings (a new process group, stdio, a
//! working directory, a cleared signal mask and default SIGPIPE, the
//! environment given), and nothing else: it runs in a copy of a
//! multi-threaded process, so it only makes async-signal-safe system
//! calls on memory prepared before the clone, and reports a failure as
//! an errno on a close-on-exec pipe, as std does.
//!
//! Where the kernel or a seccomp filter refuses clone3 (older than 5.7,
//! some container runtimes), [`spawn`] says [`Born::Unsupported`] and the
//! caller forks and joins as before.
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::libc;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

/// What the child's stdin is.
pub enum BornStdin {
    Null,
    File(std::fs::File),
    Piped,
}

/// What to run, already resolved the way `Command` would resolve it.
pub struct Launch<'a> {
    pub program: &'a Path,
    pub args: &'a [String],
    pub cwd: &'a Path,
    pub env: &'a [(String, String)],
    pub stdin: BornStdin,
}

/// A child started by [`spawn`]: its pid, a pidfd to wait on, and the
/// parent's ends of its pipes.
pub struct BornChild {
    pub pid: i32,
    pidfd: AsyncFd<OwnedFd>,
    pub stdin: Option<pipe::Sender>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
}

pub enum Born {
    Started(BornChild),
    /// clone3 or CLONE_INTO_CGROUP is not available here.
    Unsupported,
}

impl BornChild {
    /// Waits for the child to end and reaps it (through its pidfd: never
    /// another process that reused the pid).
    pub async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
        use std::os::unix::process::ExitStatusExt;
        loop {
            let mut ready = self.pidfd.readable().await?;
            match waitid(Id::PIDFd(self.pidfd.get_ref().as_fd()), WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(std::process::ExitStatus::from_raw((code & 0xff) << 8)),
                Ok(WaitStatus::Signaled(_, sig, core)) => {
                    return Ok(std::process::ExitStatus::from_raw(sig as i32 | if core { 0x80 } else { 0 }))
                }
                Ok(_) => ready.clear_ready(),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Memory the child reads between clone and exec, all made before it.
struct Prepared {
    path: CString,
    argv: Vec<*const libc::c_char>,
    /// `/bin/sh path args...`, for a file without a `#!` line (execve says
    /// ENOEXEC; execvp, which std uses, runs it with the shell then).
    sh_argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    cwd: CString,
    /// (from, to) for dup2.
    stdio: [(RawFd, RawFd); 3],
    err_w: RawFd,
}

/// The program as execvp would find it: a name without a slash is looked
/// up in the child's PATH (glibc's default without one); None when no
/// executable file is found.
fn resolve(program: &Path, env: &[(String, String)], cwd: &Path) -> Result<PathBuf, i32> {
    if program.as_os_str().as_bytes().contains(&b'/') {
        return Ok(program.to_path_buf());
    }
    let path = env.iter().rev().find(|(k, _)| k == "PATH").map_or("/bin:/usr/bin", |(_, v)| v.as_str());
    // A relative entry is the child's (it execs after its chdir); a file
    // found but not executable is EACCES, as execvp says, unless one later
    // in PATH is.
    let mut found = libc::ENOENT;
    for d in path.split(':') {
        let p = cwd.join(if d.is_empty() { "." } else { d }).join(program);
        if !p.is_file() {
            continue;
        }
        if nix::unistd::access(&p, nix::unistd::AccessFlags::X_OK).is_ok() {
            return Ok(p);
        }
        found = libc::EACCES;
    }
    Err(found)
}

fn cstring(b: &[u8]) -> std::io::Result<CString> {
    CString::new(b).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL byte in an argument"))
}

fn cloexec_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

fn nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// linux/sched.h's; libc's is a c_int, which cannot hold it (it reads 0).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// The `clone_args` of clone3 (linux/sched.h, CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Starts `launch` as a process born in the cgroup whose directory is
/// open as `cgroup`, leading a process group of its own, stdout and stderr
/// piped.
pub fn spawn(cgroup: &std::fs::File, launch: Launch<'_>) -> std::io::Result<Born> {
    let path = resolve(launch.program, launch.env, launch.cwd).map_err(std::io::Error::from_raw_os_error)?;
    let path = cstring(path.as_os_str().as_bytes())?;
    let args: Vec<CString> = std::iter::once(cstring(launch.program.as_os_str().as_bytes()))
        .chain(launch.args.iter().map(|a| cstring(a.as_bytes())))
        .collect::<Result<_, _>>()?;
    let sh = cstring(b"/bin/sh")?;
    // A name given twice takes its last value, as with `Command::envs`.
    let env: std::collections::BTreeMap<&str, &str> =
        launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let env: Vec<CString> =
        env.iter().map(|(k, v)| cstring(format!("{k}={v}").as_bytes())).collect::<Result<_, _>>()?;
    let cwd = cstring(launch.cwd.as_os_str().as_bytes())?;
    let nul = |v: &mut Vec<*const libc::c_char>| v.push(std::ptr::null());
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    nul(&mut argv);
    let mut sh_argv: Vec<*const libc::c_char> = vec![sh.as_ptr(), path.as_ptr()];
    sh_argv.extend(args.iter().skip(1).map(|a| a.as_ptr()));
    nul(&mut sh_argv);
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    nul(&mut envp);

    // The child's ends are dropped (closed here) once it is started.
    let (stdin_child, stdin_parent): (OwnedFd, Option<OwnedFd>) = match launch.stdin {
        BornStdin::Null => (std::fs::File::open("/dev/null")?.into(), None),
        BornStdin::File(f) => (f.into(), None),
        BornStdin::Piped => {
            let (r, w) = cloexec_pipe()?;
            (r, Some(w))
        }
    };
    let (out_r, out_w) = cloexec_pipe()?;
    let (err_r, err_w) = cloexec_pipe()?;
    // The parent's ends are non-blocking (their own open file
    // descriptions: the child's ends stay blocking), set before the clone
    // so that nothing after it can fail but registering them.
    for fd in [Some(&out_r), Some(&err_r), stdin_parent.as_ref()].into_iter().flatten() {
        nonblocking(fd)?;
    }
    let (report_r, report_w) = cloexec_pipe()?;
    // dup2 onto 0, 1 or 2 from a descriptor that is already there would
    // keep its close-on-exec flag: make sure none is.
    for fd in [&stdin_child, &out_w, &err_w, &report_w] {
        if fd.as_raw_fd() <= 2 {
            return Err(std::io::Error::other("the keeper's standard descriptors are not open"));
        }
    }
    let prepared = Prepared {
        path,
        argv,
        sh_argv,
        envp,
        cwd,
        stdio: [(stdin_child.as_raw_fd(), 0), (out_w.as_raw_fd(), 1), (err_w.as_raw_fd(), 2)],
        err_w: report_w.as_raw_fd(),
    };
    let mut pidfd: RawFd = -1;
    let mut args = CloneArgs {
        flags: CLONE_INTO_CGROUP | libc::CLONE_PIDFD as u64,
        pidfd: &mut pidfd as *mut RawFd as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM makes a copy of this process (fork's
    // semantics) whose only thread continues here. The child runs
    // `exec_child`, which makes only async-signal-safe system calls on
    // `prepared` (allocated before the clone, so valid in the copy) and
    // never returns: it execs or `_exit`s. `args` and `pidfd` outlive the
    // call; the size passed is the struct's.
    #[allow(unsafe_code)]
    let ret = unsafe { libc::syscall(libc::SYS_clone3, &mut args as *mut CloneArgs, std::mem::size_of::<CloneArgs>()) };
    if ret == 0 {
        // SAFETY: see above; this is the child.
        #[allow(unsafe_code)]
        unsafe {
            exec_child(&prepared)
        }
    }
    if ret < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            // No clone3 (ENOSYS; a seccomp filter's EPERM), or no
            // CLONE_INTO_CGROUP (EINVAL, E2BIG), or no cgroup2 (EBADF on a
            // v1 directory): the caller joins after fork instead.
            Some(libc::ENOSYS | libc::EPERM | libc::EINVAL | libc::E2BIG | libc::EBADF | libc::EOPNOTSUPP) => {
                Ok(Born::Unsupported)
            }
            _ => Err(e),
        };
    }
    let pid = ret as i32;
    // SAFETY: the kernel wrote a new descriptor there (CLONE_PIDFD), owned
    // by no one else.
    #[allow(unsafe_code)]
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    drop((stdin_child, out_w, err_w, report_w));
    // From here a failure must not leave the child running untracked, or
    // unreaped.
    let reap = |pidfd: &OwnedFd| {
        let _ = nix::sys::wait::waitid(nix::sys::wait::Id::PIDFd(pidfd.as_fd()), nix::sys::wait::WaitPidFlag::WEXITED);
    };
    let abandon = |pidfd: &OwnedFd, e: std::io::Error| {
        // Not yet reaped, so the pid is still this child's.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        reap(pidfd);
        e
    };
    // The child's errno if it did not exec; end of file once it did.
    let mut errno = [0u8; 4];
    let mut got = 0;
    let report = std::fs::File::from(report_r);
    while got < 4 {
        use std::io::Read;
        match (&report).read(&mut errno[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(abandon(&pidfd, e)),
        }
    }
    if got == 4 {
        // It has exited (127); reap it now.
        reap(&pidfd);
        return Err(std::io::Error::from_raw_os_error(i32::from_ne_bytes(errno)));
    }
    let pipes = (|| {
        let stdin = stdin_parent.map(pipe::Sender::from_owned_fd).transpose()?;
        Ok::<_, std::io::Error>((stdin, pipe::Receiver::from_owned_fd(out_r)?, pipe::Receiver::from_owned_fd(err_r)?))
    })();
    let (stdin, stdout, stderr) = match pipes {
        Ok(p) => p,
        Err(e) => return Err(abandon(&pidfd, e)),
    };
    // SAFETY: an OwnedFd's descriptor is valid and open, and stays the
    // same until the AsyncFd that owns it is dropped.
    #[allow(unsafe_code)]
    let pidfd = match unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            let (pidfd, e) = e.into_parts();
            return Err(abandon(&pidfd, e));
        }
    };
    Ok(Born::Started(BornChild { pid, pidfd, stdin, stdout: Some(stdout), stderr: Some(stderr) }))
}

/// The child, between clone and exec.
///
/// # Safety
/// Only in the child of `spawn`'s clone3, with `p` prepared before it.
#[allow(unsafe_code)]
unsafe fn exec_child(p: &Prepared) -> ! {
    /// Tells the parent this errno and ends the child.
    ///
    /// # Safety
    /// Only in the child, as `exec_child`.
    unsafe fn fail(fd: RawFd) -> ! {
        // SAFETY: errno is this thread's; write and _exit are
        // async-signal-safe and touch only the stack.
        unsafe {
            let b = (*libc::__errno_location()).to_ne_bytes();
            libc::write(fd, b.as_ptr().cast(), 4);
            libc::_exit(127)
        }
    }
    // SAFETY: (the whole body) each call is an async-signal-safe system
    // call wrapper on descriptors and NUL-terminated arrays made before
    // the clone; nothing allocates, locks or unwinds.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
            fail(p.err_w);
        }
        // Rust programs ignore SIGPIPE; a child must not inherit that.
        if libc::signal(libc::SIGPIPE, libc::SIG_DFL) == libc::SIG_ERR {
            fail(p.err_w);
        }
        if libc::setpgid(0, 0) != 0 {
            fail(p.err_w);
        }
        for (from, to) in p.stdio {
            if libc::dup2(from, to) < 0 {
                fail(p.err_w);
            }
        }
        if libc::chdir(p.cwd.as_ptr()) != 0 {
            fail(p.err_w);
        }
        libc::execve(p.path.as_ptr(), p.argv.as_ptr(), p.envp.as_ptr());
        if *libc::__errno_location() == libc::ENOEXEC {
            libc::execve(p.sh_argv[0], p.sh_argv.as_ptr(), p.envp.as_ptr());
        }
        fail(p.err_w)
    }
}

#[cfg(test)]
mod tests {
    use super::{resolve, spawn, Born, BornChild, BornStdin, Launch};
    use crate::containment::{CgroupRoot, ProcessCgroup};
    use std::path::Path;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn env() -> Vec<(String, String)> {
        [("PATH", "/usr/bin:/bin"), ("A", "first"), ("A", "last")].map(|(k, v)| (k.to_string(), v.to_string())).to_vec()
    }

    fn start(
        cg: &ProcessCgroup,
        program: &str,
        args: &[&str],
        cwd: &Path,
        stdin: BornStdin,
    ) -> std::io::Result<BornChild> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let env = env();
        let launch = Launch { program: Path::new(program), args: &args, cwd, env: &env, stdin };
        match spawn(&cg.dir_file()?, launch)? {
            Born::Started(c) => Ok(c),
            Born::Unsupported => panic!("clone3 into a cgroup is refused on this machine"),
        }
    }

    async fn read_all(r: Option<tokio::net::unix::pipe::Receiver>) -> String {
        let mut s = String::new();
        r.unwrap().read_to_string(&mut s).await.unwrap();
        s
    }

    /// Born in its cgroup and leading its own group before it has run a
    /// line, with the environment, directory and pipes asked for; its exit
    /// code and its death by a signal read as std's would.
    #[tokio::test]
    async fn a_child_is_born_in_its_cgroup_with_what_it_was_given() {
        let root = match CgroupRoot::create("born-test") {
            Ok(r) => r,
            Err(e) => {
                assert!(std::env::var_os("CI").is_none(), "CI has cgroup v2: {e}");
                return;
            }
        };
        // Its own name: another run of this test may share the root.
        let uid = format!("00000000-0000-4000-8000-{:012x}", std::process::id());
        let cg = ProcessCgroup::create(root.dir(), &uid).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let script = "read line; echo \"$line $A $(pwd)\"; echo err >&2; exit 7";
        let mut c = start(&cg, "sh", &["-c", script], dir.path(), BornStdin::Piped).unwrap();
        // It waits for its stdin: where it is can be looked at first.
        let seen = std::fs::read_to_string(format!("/proc/{}/cgroup", c.pid)).unwrap_or_default();
        assert_eq!(root.uid_of(c.pid), Some(uid.clone()), "not born in its cgroup: {seen:?}");
        let g = crate::journal::Group::of_leader(c.pid);
        assert!(g.is_some(), "{} does not lead a process group of its own", c.pid);
        let mut stdin = c.stdin.take().unwrap();
        stdin.write_all(b"hello\n").await.unwrap();
        drop(stdin);
        let (out, err) = (read_all(c.stdout.take()).await, read_all(c.stderr.take()).await);
        let st = c.wait().await.unwrap();
        assert_eq!(out, format!("hello last {}\n", dir.path().display()));
        assert_eq!(err, "err\n");
        assert_eq!(st.code(), Some(7));

        let mut c = start(&cg, "sh", &["-c", "kill -9 $$"], dir.path(), BornStdin::Null).unwrap();
        let st = c.wait().await.unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!((st.code(), st.signal()), (None, Some(9)));

        // A file without a #! line runs with the shell, as execvp runs it.
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "echo plain \"$1\"\n").unwrap();
        std::fs::set_permissions(&plain, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let mut c = start(&cg, plain.to_str().unwrap(), &["x"], dir.path(), BornStdin::Null).unwrap();
        assert_eq!(read_all(c.stdout.take()).await, "plain x\n");
        assert_eq!(c.wait().await.unwrap().code(), Some(0));

        // What cannot start says why, as std would, and leaves no child.
        let e = start(&cg, "no-such-program-here", &[], dir.path(), BornStdin::Null).err().unwrap();
        assert_eq!(e.raw_os_error(), Some(nix::libc::ENOENT));
        let e = start(&cg, "true", &[], &dir.path().join("gone"), BornStdin::Null).err().unwrap();
        assert_eq!(e.raw_os_error(), Some(nix::libc::ENOENT), "a missing working directory");
        std::fs::write(dir.path().join("data"), "x").unwrap();
        let e = start(&cg, dir.path().join("data").to_str().unwrap(), &[], dir.path(), BornStdin::Null).err().unwrap();
        assert_eq!(e.raw_os_error(), Some(nix::libc::EACCES), "a file that is not executable");
        assert!(cg.members().is_empty(), "a child that could not start is still there: {:?}", cg.members());
        cg.end().await;
        root.remove_if_empty();
    }

    /// A name is looked up as execvp would from the child: relative PATH
    /// entries from its working directory, a file that is not executable
    /// EACCES, nothing ENOENT; a path with a slash is taken as it is.
    #[test]
    fn programs_are_found_as_execvp_finds_them() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        for (name, mode) in [("tool", 0o755), ("data", 0o644)] {
            let p = dir.path().join("bin").join(name);
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let env = vec![("PATH".to_string(), "bin:/usr/bin".to_string())];
        assert_eq!(resolve(Path::new("tool"), &env, dir.path()), Ok(dir.path().join("bin/tool")));
        assert_eq!(resolve(Path::new("data"), &env, dir.path()), Err(nix::libc::EACCES));
        assert_eq!(resolve(Path::new("no-such-program-here"), &env, dir.path()), Err(nix::libc::ENOENT));
        assert_eq!(resolve(Path::new("./x"), &env, dir.path()), Ok(std::path::PathBuf::from("./x")));
    }
}
