//! Shell completion, as kubectl's `__complete` does it: the shell runs
//! testbusctl itself at each <TAB> (clap_complete's dynamic engine:
//! `COMPLETE=SHELL testbusctl -- WORDS…`, registered by `testbusctl
//! completion SHELL`). Subcommands, flags and kinds come from the command
//! definition; object names are asked of the server with the user's own
//! credentials, bounded by [`ASK_FOR`] so that a slow or absent server
//! costs a <TAB> that long at most and completes nothing.
use crate::objects::parse_kind;
use clap_complete::engine::CompletionCandidate;
use std::ffi::OsStr;
use std::time::Duration;
use testbus_client::Client;
use testbus_proto::{Host, HostPool, Kind, Process, Test};

/// How long a completion waits for the server.
pub const ASK_FOR: Duration = Duration::from_secs(2);

/// The kinds, as `get`, `describe` and `delete` take them.
const KIND_WORDS: [&str; 8] = ["hosts", "tests", "processes", "hostpools", "host", "test", "process", "hostpool"];

/// Answers a completion request when the shell asks for one (then exits);
/// otherwise returns and testbusctl runs as usual. Called first thing in
/// `main`, before any thread is started.
pub fn answer_if_asked<C: clap::CommandFactory>() {
    clap_complete::CompleteEnv::with_factory(C::command).complete();
}

/// The registration script `testbusctl completion SHELL` prints.
pub fn registration(shell: &str) -> std::io::Result<Vec<u8>> {
    let shells = clap_complete::env::Shells::builtins();
    let Some(sh) = shells.completer(shell) else {
        return Err(std::io::Error::other(format!("no completion for shell {shell:?}")));
    };
    // The completer is this binary as it was invoked (a bare name is
    // found on PATH at each <TAB>).
    let me = std::env::args().next().unwrap_or_else(|| "testbusctl".into());
    let me = match me.contains('/') {
        true => std::env::current_exe().map(|p| p.display().to_string()).unwrap_or(me),
        false => me,
    };
    let mut buf = Vec::new();
    sh.write_registration("COMPLETE", "testbusctl", "testbusctl", &me, &mut buf)?;
    Ok(buf)
}

/// The words being completed, as the shell passed them (after `--`),
/// without the program's name: the engine gives a completer only the
/// current word, and names depend on the words before it.
fn words() -> Vec<String> {
    let args: Vec<String> = std::env::args().collect();
    let after = args.iter().position(|a| a == "--").map_or(args.len(), |i| i + 1);
    args.into_iter().skip(after + 1).collect()
}

/// The subcommand and its positional words before the current one (flags
/// and their values left out, as far as a word alone tells).
fn positionals(words: &[String]) -> (String, Vec<String>) {
    let mut it = words.iter().take(words.len().saturating_sub(1)).peekable();
    let mut pos: Vec<String> = Vec::new();
    let mut cmd = String::new();
    while let Some(w) = it.next() {
        if w.starts_with('-') {
            // A flag of the form `--flag value` takes the next word.
            if !w.contains('=') && takes_value(w) {
                it.next();
            }
        } else if cmd.is_empty() {
            cmd = w.clone();
        } else {
            pos.push(w.clone());
        }
    }
    (cmd, pos)
}

/// Flags (of any subcommand) that take a value in the next word.
fn takes_value(flag: &str) -> bool {
    matches!(
        flag,
        "--server"
            | "-o"
            | "--output"
            | "-l"
            | "--selector"
            | "--sort-by"
            | "-L"
            | "--label-columns"
            | "--role"
            | "--step"
            | "--tail"
            | "--since"
            | "--since-time"
            | "--timeout"
            | "--message"
            | "--reason"
            | "-f"
            | "--filename"
    )
}

/// The server named on the command line, if it is.
fn server_flag(words: &[String]) -> Option<String> {
    words.iter().enumerate().find_map(|(i, w)| match w.strip_prefix("--server=") {
        Some(v) => Some(v.to_string()),
        None if w == "--server" => words.get(i + 1).cloned(),
        None => None,
    })
}

/// The server testbusctl would use for these words: `--server`, else
/// $TESTBUS_SERVER (clap reads it for a command; here nothing has parsed
/// them), else the config file's (`config::connect`).
fn server(words: &[String]) -> Option<String> {
    server_flag(words).or_else(|| std::env::var("TESTBUS_SERVER").ok().filter(|s| !s.is_empty()))
}

/// Names of the objects of `kind` on the server; none when it cannot be
/// asked within [`ASK_FOR`].
fn names_of(kind: Kind, server: Option<String>) -> Vec<String> {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return vec![] };
    rt.block_on(async move {
        let ask = async {
            let client = crate::config::connect(server.as_deref()).await.ok()?;
            list(&client, kind).await
        };
        tokio::time::timeout(ASK_FOR, ask).await.ok().flatten().unwrap_or_default()
    })
}

async fn list(client: &Client, kind: Kind) -> Option<Vec<String>> {
    async fn of<K: testbus_client::ApiResource>(client: &Client) -> Option<Vec<String>> {
        let (items, _) = client.api::<K>().list("", "").await.ok()?;
        Some(items.iter().map(|o| o.name().to_string()).collect())
    }
    match kind {
        Kind::Host => of::<Host>(client).await,
        Kind::Test => of::<Test>(client).await,
        Kind::Process => of::<Process>(client).await,
        Kind::HostPool => of::<HostPool>(client).await,
    }
}

/// Candidates from `names` that start with `current`, each with `prefix`
/// (`test/`) when the user is typing that form.
fn matching(current: &str, prefix: &str, names: Vec<String>) -> Vec<CompletionCandidate> {
    let mut out: Vec<CompletionCandidate> = names
        .into_iter()
        .map(|n| format!("{prefix}{n}"))
        .filter(|n| n.starts_with(current))
        .map(CompletionCandidate::new)
        .collect();
    out.sort();
    out
}

/// A word that is KIND, or KIND/NAME once a `/` is typed.
fn kind_or_ref(current: &str, server: Option<String>) -> Vec<CompletionCandidate> {
    match current.split_once('/') {
        Some((k, _)) => match parse_kind(k) {
            Ok(kind) => matching(current, &format!("{k}/"), names_of(kind, server)),
            Err(_) => vec![],
        },
        None => KIND_WORDS.iter().filter(|w| w.starts_with(current)).map(|w| CompletionCandidate::new(*w)).collect(),
    }
}

/// `get`/`describe`/`delete`: the first word is a kind (or KIND/NAME); the
/// next ones names of that kind, or more KIND/NAMEs.
pub fn kinds_and_names(current: &OsStr) -> Vec<CompletionCandidate> {
    let current = current.to_string_lossy();
    let words = words();
    let server = server(&words);
    let (_, pos) = positionals(&words);
    match pos.first() {
        None => kind_or_ref(&current, server),
        Some(first) if first.contains('/') || current.contains('/') => kind_or_ref(&current, server),
        Some(first) => match parse_kind(first) {
            Ok(kind) => matching(&current, "", names_of(kind, server)),
            Err(_) => vec![],
        },
    }
}

/// A test, as NAME or test/NAME.
pub fn tests(current: &OsStr) -> Vec<CompletionCandidate> {
    let current = current.to_string_lossy();
    let server = server(&words());
    let prefix = if current.starts_with("test/") { "test/" } else { "" };
    matching(&current, prefix, names_of(Kind::Test, server))
}

/// A test (NAME or test/NAME) or a process (process/NAME), for `logs`.
pub fn tests_or_processes(current: &OsStr) -> Vec<CompletionCandidate> {
    let cur = current.to_string_lossy();
    if cur.starts_with("process/") {
        return matching(&cur, "process/", names_of(Kind::Process, server(&words())));
    }
    let mut out = tests(current);
    if "process/".starts_with(cur.as_ref()) {
        out.push(CompletionCandidate::new("process/"));
    }
    out
}

/// A host's name.
pub fn hosts(current: &OsStr) -> Vec<CompletionCandidate> {
    let current = current.to_string_lossy();
    matching(&current, "", names_of(Kind::Host, server(&words())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn the_words_before_the_current_one_say_the_command_and_its_positionals() {
        assert_eq!(positionals(&w("get tests ")), ("get".into(), vec!["tests".into()]));
        assert_eq!(
            positionals(&w("--server https://x:1 get -o wide -l a=b hosts h")),
            ("get".into(), vec!["hosts".into()])
        );
        assert_eq!(positionals(&w("logs --role=client ")), ("logs".into(), vec![]));
        assert_eq!(positionals(&w("")), (String::new(), vec![]));
        assert_eq!(server_flag(&w("get --server https://x:1 tests")), Some("https://x:1".into()));
        assert_eq!(server_flag(&w("--server=unix:/s get")), Some("unix:/s".into()));
        assert_eq!(server_flag(&w("get tests")), None);
    }

    #[test]
    fn kinds_complete_without_a_server_and_names_keep_their_form() {
        let words = |c: Vec<CompletionCandidate>| -> Vec<String> {
            c.iter().map(|c| c.get_value().to_string_lossy().into_owned()).collect()
        };
        assert_eq!(words(kind_or_ref("ho", None)), ["hosts", "hostpools", "host", "hostpool"]);
        assert_eq!(words(kind_or_ref("nope/", None)), Vec::<String>::new());
        let names = vec!["web".to_string(), "web-2".into(), "nfs".into()];
        assert_eq!(words(matching("test/w", "test/", names.clone())), ["test/web", "test/web-2"]);
        assert_eq!(words(matching("", "", names)), ["nfs", "web", "web-2"]);
    }
}
