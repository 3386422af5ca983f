//! Starting and stopping `dmaprobe serve` as a careless user would: paths that
//! hold something else, a ledger that cannot be written, two daemons on one
//! disk file. What must hold: the daemon refuses before it touches anything,
//! says which path and what to do, and at exit removes only what it made.

mod common;

use common::child::*;

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// What a `dmaprobe serve` child did within [`SOON`].
#[derive(Debug)]
enum Outcome {
    /// It exited, with what it wrote to stderr.
    Exited(ExitStatus, String),
    /// It got as far as serving (its control socket answers); it was killed.
    Served,
}

/// A daemon on `disk` beside the fixture's, with sockets `NAME.sock` and
/// `NAME.ctl` in `dir` and `extra` arguments: how far it gets.
fn another_daemon(dir: &Path, name: &str, disk: &Path, extra: &[&str]) -> Outcome {
    let socket = dir.join(format!("{name}.sock"));
    let control = dir.join(format!("{name}.ctl"));
    let mut args = vec![
        "--socket",
        socket.to_str().unwrap(),
        "--disk",
        disk.to_str().unwrap(),
        "--control",
        control.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    serve_outcome(&args, &control)
}

/// Runs `dmaprobe serve ARGS` until it exits or its control socket at
/// `control` answers (then kills it).
fn serve_outcome(args: &[&str], control: &Path) -> Outcome {
    let dir = tempfile::tempdir().expect("temp dir");
    let err = dir.path().join("serve.err");
    let mut child = spawn_serve(args, &err);
    let deadline = Instant::now() + SOON;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Outcome::Exited(status, fs::read_to_string(&err).unwrap_or_default());
        }
        if UnixStream::connect(control).is_ok() {
            let _ = child.kill();
            let _ = child.wait();
            return Outcome::Served;
        }
        assert!(
            Instant::now() < deadline,
            "dmaprobe serve {args:?} neither exited nor served in {SOON:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn spawn_serve(args: &[&str], stderr: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dmaprobe"))
        .arg("serve")
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(stderr).expect("stderr file"))
        .spawn()
        .expect("spawn dmaprobe serve")
}

/// The refusal's message, or a panic saying what happened instead.
fn refusal(outcome: Outcome, what: &str) -> String {
    match outcome {
        Outcome::Exited(status, stderr) => {
            assert!(!status.success(), "{what}: exited 0: {stderr}");
            stderr
        }
        Outcome::Served => panic!("{what}: the daemon started and served"),
    }
}

fn is_socket(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Waits until the daemon listens on its --socket (which it binds after the
/// control socket, so both are in place); the connection is dropped at once.
fn wait_listening(s: &mut Serve) {
    let deadline = Instant::now() + SOON;
    while UnixStream::connect(&s.socket).is_err() {
        s.assert_alive();
        assert!(
            Instant::now() < deadline,
            "nothing listens on {} after {SOON:?}",
            s.socket.display()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_regular_file_at_the_socket_path_is_kept_and_the_daemon_refuses_to_start() {
    for transport in [&[][..], &["--nvme"][..]] {
        let dir = tempfile::tempdir().unwrap();
        let precious = dir.path().join("disk.img");
        let disk = dir.path().join("new-disk.img");
        let control = dir.path().join("c.ctl");
        fs::write(&precious, "a file that is not a socket\n").unwrap();
        let mut args = vec![
            "--socket",
            precious.to_str().unwrap(),
            "--disk",
            disk.to_str().unwrap(),
            "--size",
            "1M",
            "--control",
            control.to_str().unwrap(),
        ];
        args.extend_from_slice(transport);
        let outcome = serve_outcome(&args, &control);
        assert_eq!(
            fs::read_to_string(&precious).ok().as_deref(),
            Some("a file that is not a socket\n"),
            "{transport:?}: the regular file at the --socket path is gone ({outcome:?})"
        );
        let stderr = refusal(
            outcome,
            &format!("{transport:?} --socket on a regular file"),
        );
        assert!(
            stderr.contains(precious.to_str().unwrap())
                && stderr.contains("is not a socket")
                && stderr.contains("give --socket another path"),
            "{transport:?}: the refusal names the path and what to do: {stderr}"
        );
        // Refused before anything else started: no disk file made, no control socket.
        assert!(
            !disk.exists(),
            "{transport:?}: the disk file was created before the refusal"
        );
        assert!(
            !control.exists(),
            "{transport:?}: the control socket was created before the refusal"
        );
    }
}

#[test]
fn a_stale_socket_at_the_socket_path_is_replaced() {
    for transport in [&[][..], &["--nvme"][..]] {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("blk.sock");
        let control = dir.path().join("c.ctl");
        // A socket nobody listens on any more, as a killed daemon leaves.
        drop(UnixListener::bind(&socket).unwrap());
        assert!(is_socket(&socket));
        let mut args = vec![
            "--socket",
            socket.to_str().unwrap(),
            "--mem",
            "1M",
            "--control",
            control.to_str().unwrap(),
        ];
        args.extend_from_slice(transport);
        assert!(
            matches!(serve_outcome(&args, &control), Outcome::Served),
            "{transport:?}: a stale socket is replaced"
        );
    }
}

#[test]
fn the_sockets_are_for_their_owner_only() {
    for transport in [&[][..], &["--nvme"][..]] {
        let mut s = Serve::start(transport);
        wait_listening(&mut s);
        assert_eq!(
            mode(&s.socket),
            0o600,
            "{transport:?}: the mode of the --socket socket is {:o}",
            mode(&s.socket)
        );
        assert_eq!(mode(&s.control), 0o600, "{transport:?}: the control socket");
    }
}

#[test]
fn at_exit_the_daemon_removes_its_own_sockets_and_nothing_that_replaced_them() {
    for transport in [&[][..], &["--nvme"][..]] {
        // Left alone: both sockets go at exit.
        let mut s = Serve::start(transport);
        wait_listening(&mut s);
        assert!(s.terminate().success(), "{transport:?}: exit status");
        assert!(!s.socket.exists(), "{transport:?}: the socket is left");
        assert!(
            !s.control.exists(),
            "{transport:?}: the control socket is left"
        );

        // Replaced while it served (someone moved them and put their own
        // there): the replacements stay.
        let mut s = Serve::start(transport);
        wait_listening(&mut s);
        fs::rename(&s.socket, s.dir.path().join("moved.sock")).unwrap();
        fs::write(&s.socket, "someone else's\n").unwrap();
        fs::rename(&s.control, s.dir.path().join("moved.ctl")).unwrap();
        let theirs = UnixListener::bind(&s.control).unwrap();
        assert!(s.terminate().success(), "{transport:?}: exit status");
        assert_eq!(
            fs::read_to_string(&s.socket).ok().as_deref(),
            Some("someone else's\n"),
            "{transport:?}: the file that replaced the --socket socket was removed at exit"
        );
        assert!(
            is_socket(&s.control),
            "{transport:?}: the socket that replaced the control socket was removed at exit"
        );
        drop(theirs);
    }
}

#[test]
fn a_ledger_that_cannot_be_created_fails_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("blk.sock");
    let control = dir.path().join("c.ctl");
    let ledger = dir.path().join("no-such-dir").join("ledger.jsonl");
    let outcome = serve_outcome(
        &[
            "--socket",
            socket.to_str().unwrap(),
            "--mem",
            "1M",
            "--control",
            control.to_str().unwrap(),
            "--ledger",
            ledger.to_str().unwrap(),
        ],
        &control,
    );
    let stderr = refusal(outcome, "--ledger in a missing directory");
    assert!(
        stderr.contains(ledger.to_str().unwrap()) && stderr.contains("No such file or directory"),
        "the refusal names the ledger path and the cause: {stderr}"
    );
    assert!(!socket.exists(), "the socket was left behind");
}

#[test]
fn a_ledger_is_written_at_exit_over_an_old_one() {
    let mut s = Serve::start(&[]);
    let path = s.dir.path().join("ledger.jsonl");
    // Made at start: a path that cannot be written would have stopped it.
    assert!(path.exists(), "the ledger file is not created at start");
    let mut fe = s.connect(1);
    write_ok(&mut fe, 0, &[7; 512]);
    drop(fe);
    assert!(s.terminate().success());
    assert_eq!(s.ledger_file_requests().len(), 1);
    // Written afresh by the next daemon: no entry of the first is left.
    let before = fs::read_to_string(&path).unwrap();
    s.kill_and_restart(&[]);
    assert!(s.terminate().success());
    let after = fs::read_to_string(&path).unwrap();
    assert!(
        after.len() < before.len(),
        "the old ledger was kept: {after}"
    );
    assert_eq!(s.ledger_file_requests().len(), 0);
}

#[test]
fn a_second_daemon_on_the_same_disk_file_refuses_to_start() {
    let mut s = Serve::start(&[]);
    let dir = s.dir.path().to_owned();
    let other = dir.join("other.sock");
    let disk = s.disk.clone();
    let second = |extra: &[&str]| another_daemon(&dir, "other", &disk, extra);
    for extra in [&[][..], &["--read-only"][..], &["--nvme"][..]] {
        let stderr = refusal(
            second(extra),
            &format!("a second daemon {extra:?} on the disk file the first one serves"),
        );
        assert!(
            stderr.contains(disk.to_str().unwrap()) && stderr.contains("another process"),
            "{extra:?}: the refusal names the file and says another process holds it: {stderr}"
        );
        assert!(
            !other.exists(),
            "{extra:?}: the refused daemon left its socket"
        );
    }
    // The first goes on serving.
    s.assert_alive();
    let mut fe = s.connect(1);
    write_ok(&mut fe, 0, &[3; 512]);
    drop(fe);
    // Killed with SIGKILL, its lock goes with it: a new daemon gets the file.
    s.kill_and_restart(&[]);
    let mut fe = s.connect(1);
    assert_eq!(
        fe.read(0, backend::vhost_user_driver::Sector(0), 512)
            .unwrap()
            .1,
        vec![3; 512]
    );
    drop(fe);
    // Stopped cleanly, too.
    assert!(s.terminate().success());
    assert!(matches!(second(&[]), Outcome::Served));
}

#[test]
fn read_only_daemons_share_a_disk_file_and_a_writer_is_refused() {
    let mut s = Serve::start(&["--read-only"]);
    let disk = s.disk.clone();
    let run = |name: &str, extra: &[&str]| another_daemon(s.dir.path(), name, &disk, extra);
    assert!(
        matches!(run("reader", &["--read-only"]), Outcome::Served),
        "a second read-only daemon shares the file"
    );
    let stderr = refusal(run("writer", &[]), "a writer beside a read-only daemon");
    assert!(stderr.contains("another process"), "{stderr}");
    s.assert_alive();
}
