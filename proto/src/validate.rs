//! Validation shared by the server (authoritative) and the CLI (early, before
//! anything is sent). Every error names the field it is about.
use crate::resource::Resource;
use crate::{duration, FileRef, Host, HostPool, HostRequirement, ObjectMeta, Process, Step, Test};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// All the problems found in one object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|e| e.to_string()).collect();
        f.write_str(&parts.join("; "))
    }
}

/// Collects errors with their paths.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError { path: path.into(), message: message.into() });
    }
    fn finish(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(self.0))
        }
    }
}

pub const MAX_NAME: usize = 63;
pub const MAX_COUNT: u32 = 1000;
pub const MAX_HOSTS_PER_TEST: u32 = 1000;
pub const MAX_STEPS: usize = 1000;
pub const MAX_PROCESSES: usize = 10_000;
pub const MAX_ENV_ENTRIES: usize = 1000;
pub const MAX_VALUE_BYTES: usize = 128 * 1024;
/// Most bytes of a test's own env, keys and values together.
pub const MAX_TEST_ENV_BYTES: usize = 256 * 1024;
/// Most bytes of a test's spec, encoded: a stored object holds 1.5 MiB,
/// and the status a claim writes copies the env twice more.
pub const MAX_SPEC_BYTES: usize = 512 * 1024;

/// Why a name is not one (each says what a name of its kind must be).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {0} characters")]
    TooLong(usize),
    #[error(
        "{0:?} is not a DNS label (lower-case letters, digits and '-', starting and ending with a letter or digit)"
    )]
    NotDnsLabel(String),
    #[error("{0:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)")]
    NotVariable(String),
    #[error("{0:?} is not a host variable name (host_ then [A-Za-z0-9_-]+)")]
    NotHostVariable(String),
    #[error("{0:?} must be 1-253 of [A-Za-z0-9._-]")]
    NotSyncKey(String),
}

impl From<NameError> for String {
    fn from(e: NameError) -> String {
        e.to_string()
    }
}

/// A DNS-1123 label: lower-case alphanumerics and '-', starting and ending
/// with an alphanumeric, at most 63 characters.
pub fn dns_label(s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > MAX_NAME {
        return Err(NameError::TooLong(MAX_NAME));
    }
    let ok = s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let b = s.as_bytes();
    if !ok || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return Err(NameError::NotDnsLabel(s.to_string()));
    }
    Ok(())
}

pub fn env_name(s: &str) -> Result<(), NameError> {
    let b = s.as_bytes();
    if b.is_empty()
        || !(b[0].is_ascii_alphabetic() || b[0] == b'_')
        || !b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
    {
        return Err(NameError::NotVariable(s.to_string()));
    }
    Ok(())
}

fn label_part(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

fn meta(m: &ObjectMeta, e: &mut Errors) {
    if m.name.is_empty() {
        if m.generate_name.is_empty() {
            e.add("metadata.name", "required (or metadata.generateName)");
        } else if let Err(msg) = dns_label(&format!("{}x", m.generate_name)) {
            e.add("metadata.generateName", msg);
        } else if m.generate_name.len() > MAX_NAME - 6 {
            e.add("metadata.generateName", format!("must be at most {} characters", MAX_NAME - 6));
        }
    } else if let Err(msg) = dns_label(&m.name) {
        e.add("metadata.name", msg);
    }
    labels("metadata.labels", &m.labels, e);
    let ann: usize = m.annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if ann > MAX_VALUE_BYTES {
        e.add("metadata.annotations", format!("larger than {MAX_VALUE_BYTES} bytes"));
    }
}

fn labels(path: &str, labels: &BTreeMap<String, String>, e: &mut Errors) {
    for (k, v) in labels {
        if !label_part(k) {
            e.add(format!("{path}.{k}"), "label keys are 1-63 of [A-Za-z0-9-_./]");
        }
        if !v.is_empty() && !label_part(v) {
            e.add(format!("{path}.{k}"), "label values are at most 63 of [A-Za-z0-9-_./]");
        }
    }
}

/// Published host variables: `host_<member>_<var>` names, so [A-Za-z0-9_].
fn vars(path: &str, vars: &BTreeMap<String, String>, e: &mut Errors) {
    for (k, v) in vars {
        if k.is_empty() || k.len() > MAX_NAME || !k.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') {
            e.add(format!("{path}.{k}"), format!("{k:?} is not a variable name ([A-Za-z0-9_]+)"));
        }
        if v.len() > MAX_VALUE_BYTES || v.contains('\0') {
            e.add(format!("{path}.{k}"), format!("must be at most {MAX_VALUE_BYTES} bytes without NUL"));
        }
    }
}

fn capabilities(path: &str, caps: &[String], e: &mut Errors) {
    for (j, c) in caps.iter().enumerate() {
        if !label_part(c) {
            e.add(format!("{path}[{j}]"), "capabilities are 1-63 of [A-Za-z0-9-_./]");
        }
    }
}

fn env(path: &str, env: &BTreeMap<String, String>, e: &mut Errors) {
    if env.len() > MAX_ENV_ENTRIES {
        e.add(path, format!("more than {MAX_ENV_ENTRIES} entries"));
    }
    for (k, v) in env {
        if let Err(msg) = env_name(k) {
            e.add(format!("{path}.{k}"), msg);
        }
        if v.len() > MAX_VALUE_BYTES {
            e.add(format!("{path}.{k}"), format!("value larger than {MAX_VALUE_BYTES} bytes"));
        }
        if v.contains('\0') {
            e.add(format!("{path}.{k}"), "must not contain NUL");
        }
    }
}

fn opt_duration(path: &str, s: &str, e: &mut Errors) {
    if !s.is_empty() {
        if let Err(err) = duration::parse(s) {
            e.add(path, err.to_string());
        }
    }
}

fn command(path: &str, argv: &[String], script: &str, shell: bool, e: &mut Errors) {
    match (argv.is_empty(), script.is_empty()) {
        (true, true) => e.add(path, "one of argv or script is required"),
        (false, false) => e.add(format!("{path}.script"), "give either argv or script, not both"),
        _ => {}
    }
    if shell && argv.is_empty() {
        e.add(format!("{path}.shell"), "shell: true needs argv (the command line given to sh -c)");
    }
    if !argv.is_empty() && argv[0].is_empty() {
        e.add(format!("{path}.argv[0]"), "must not be empty");
    }
    for (i, a) in argv.iter().enumerate() {
        if a.contains('\0') {
            e.add(format!("{path}.argv[{i}]"), "must not contain NUL");
        }
    }
    if script.len() > MAX_VALUE_BYTES {
        e.add(format!("{path}.script"), format!("larger than {MAX_VALUE_BYTES} bytes"));
    }
}

pub const MAX_FILES: usize = 1000;

/// A file reference: `source` (in a manifest) or `digest` (once uploaded);
/// a destination (`path` and/or `env`) unless it is a stdin file.
fn file_ref(p: &str, f: &FileRef, needs_destination: bool, e: &mut Errors) {
    match (f.source.is_empty(), f.digest.is_empty()) {
        (true, true) => e.add(p, "one of source or digest is required"),
        (false, false) => e.add(format!("{p}.source"), "give either source or digest, not both"),
        _ => {}
    }
    if !f.digest.is_empty() && !crate::blob::valid_digest(&f.digest) {
        e.add(format!("{p}.digest"), "must be sha256: and 64 lower-case hex digits");
    }
    if f.source.contains('\0') {
        e.add(format!("{p}.source"), "must not contain NUL");
    }
    if needs_destination && f.path.is_empty() && f.env.is_empty() {
        e.add(p, "one of path or env is required");
    }
    if !f.path.is_empty() {
        if f.path.contains('\0') || f.path.len() > 4096 {
            e.add(format!("{p}.path"), "must be at most 4096 bytes without NUL");
        } else if f.path.split('/').any(|c| c == "..") {
            e.add(format!("{p}.path"), format!("{:?} must not contain '..'", f.path));
        } else if f.path.ends_with('/') {
            e.add(format!("{p}.path"), "must name a file, not a directory");
        }
    }
    if !f.env.is_empty() {
        if let Err(m) = env_name(&f.env) {
            e.add(format!("{p}.env"), m);
        }
    }
    if !f.mode.is_empty() && parse_mode(&f.mode).is_none() {
        e.add(format!("{p}.mode"), format!("{:?} is not an octal file mode such as \"0644\"", f.mode));
    }
}

/// "0644", "644", "0755" → the mode bits.
pub fn parse_mode(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    u32::from_str_radix(s, 8).ok()
}

fn files(p: &str, fs: &[FileRef], e: &mut Errors) {
    if fs.len() > MAX_FILES {
        e.add(p, format!("more than {MAX_FILES} files"));
    }
    for (i, f) in fs.iter().enumerate() {
        file_ref(&format!("{p}[{i}]"), f, true, e);
    }
}

/// Every file reference of a test (child tests included), with its field
/// path.
pub fn file_refs_of_test(t: &Test) -> Vec<(String, &FileRef)> {
    let s = t.spec();
    let mut out = Vec::new();
    level_file_refs("spec", &s.files, &s.steps, &s.tests, &mut out);
    out
}

/// Every file reference of a test (child tests included), to change: the
/// same walk as [`file_refs_of_test`].
pub fn file_refs_of_test_mut(t: &mut Test) -> Vec<&mut FileRef> {
    fn level<'a>(
        files: &'a mut [FileRef],
        steps: &'a mut [Step],
        children: &'a mut [crate::ChildTest],
        out: &mut Vec<&'a mut FileRef>,
    ) {
        out.extend(files.iter_mut());
        for st in steps.iter_mut() {
            out.extend(st.files.iter_mut());
            out.extend(st.stdin_file.as_mut());
        }
        for c in children.iter_mut() {
            level(&mut c.files, &mut c.steps, &mut c.tests, out);
        }
    }
    let s = t.spec_mut();
    let mut out = Vec::new();
    level(&mut s.files, &mut s.steps, &mut s.tests, &mut out);
    out
}

fn level_file_refs<'a>(
    p: &str,
    files: &'a [FileRef],
    steps: &'a [Step],
    children: &'a [crate::ChildTest],
    out: &mut Vec<(String, &'a FileRef)>,
) {
    out.extend(files.iter().enumerate().map(|(i, f)| (format!("{p}.files[{i}]"), f)));
    for (i, st) in steps.iter().enumerate() {
        out.extend(st.files.iter().enumerate().map(|(j, f)| (format!("{p}.steps[{i}].files[{j}]"), f)));
        if let Some(f) = &st.stdin_file {
            out.push((format!("{p}.steps[{i}].stdinFile"), f));
        }
    }
    for (i, c) in children.iter().enumerate() {
        level_file_refs(&format!("{p}.tests[{i}]"), &c.files, &c.steps, &c.tests, out);
    }
}

/// Role members a host requirement expands to: count 1 → the role name,
/// count n → role0 .. role{n-1}.
pub fn members(h: &HostRequirement) -> Vec<String> {
    let n = h.count.unwrap_or(1);
    if n == 1 {
        vec![h.role.clone()]
    } else {
        (0..n).map(|i| format!("{}{i}", h.role)).collect()
    }
}

/// Whether `member` ("client1") belongs to `role_or_member` ("client" or
/// "client1").
pub fn member_matches(member: &str, role_or_member: &str) -> bool {
    member == role_or_member
        || member
            .strip_prefix(role_or_member)
            .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
}

/// Sync keys and barrier names: 1-253 of [A-Za-z0-9._-].
pub fn sync_key(s: &str) -> Result<(), NameError> {
    if s.is_empty() || s.len() > 253 || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Err(NameError::NotSyncKey(s.to_string()));
    }
    Ok(())
}

/// A state field (phase, condition status): empty, or one of its enum's
/// values.
fn state<T: std::str::FromStr<Err = crate::states::Unknown>>(field: impl Into<String>, value: &str, e: &mut Errors) {
    if !value.is_empty() {
        if let Err(u) = value.parse::<T>() {
            e.add(field, u.to_string());
        }
    }
}

fn conditions(field: &str, conds: &[crate::Condition], e: &mut Errors) {
    for (i, c) in conds.iter().enumerate() {
        state::<crate::states::ConditionStatus>(format!("{field}[{i}].status"), &c.status, e);
    }
}

pub trait Validate {
    fn validate(&self) -> Result<(), ValidationErrors>;
}

impl Validate for Test {
    fn validate(&self) -> Result<(), ValidationErrors> {
        let mut e = Errors::default();
        meta(self.meta(), &mut e);
        let s = self.spec();
        if self.spec.is_none() {
            e.add("spec", "required");
        }
        opt_duration("spec.timeout", &s.timeout, &mut e);
        opt_duration("spec.ttlAfterFinished", &s.ttl_after_finished, &mut e);
        opt_duration("spec.pendingTimeout", &s.pending_timeout, &mut e);
        files("spec.files", &s.files, &mut e);
        env("spec.env", &s.env, &mut e);
        // Sizes are checked where they multiply: a test's env is copied
        // into its status and its trace at the claim, and all of it must
        // still fit one stored object.
        let env_bytes: usize = s.env.iter().map(|(k, v)| k.len() + v.len()).sum();
        if env_bytes > MAX_TEST_ENV_BYTES {
            e.add(
                "spec.env",
                format!(
                    "{env_bytes} bytes in all; at most {MAX_TEST_ENV_BYTES} (a test's env is copied into its status and trace)"
                ),
            );
        }
        let spec_bytes = prost::Message::encoded_len(s);
        if spec_bytes > MAX_SPEC_BYTES {
            e.add(
                "spec",
                format!("{spec_bytes} bytes encoded; at most {MAX_SPEC_BYTES} (room is kept for its status)"),
            );
        }
        if s.hosts.is_empty() {
            e.add("spec.hosts", "at least one host is required");
        }
        // role → its members; member → the role it belongs to.
        let mut roles: HashMap<&str, Vec<String>> = HashMap::new();
        let mut member_of: HashMap<String, String> = HashMap::new();
        let mut total = 0u32;
        for (i, h) in s.hosts.iter().enumerate() {
            let p = format!("spec.hosts[{i}]");
            if let Err(msg) = dns_label(&h.role) {
                e.add(format!("{p}.role"), msg);
            }
            match h.count {
                Some(0) => e.add(format!("{p}.count"), "must be >= 1"),
                Some(n) if n > MAX_COUNT => e.add(format!("{p}.count"), format!("must be <= {MAX_COUNT}")),
                _ => {}
            }
            total = total.saturating_add(h.count.unwrap_or(1).min(MAX_COUNT));
            capabilities(&format!("{p}.capabilities"), &h.capabilities, &mut e);
            if let Err(msg) = crate::selector::LabelSelector::parse(&h.selector) {
                e.add(format!("{p}.selector"), msg.to_string());
            }
            if !h.host.is_empty() {
                if let Err(msg) = dns_label(&h.host) {
                    e.add(format!("{p}.host"), msg);
                }
                if h.count.unwrap_or(1) != 1 {
                    e.add(format!("{p}.count"), "a role pinned to one host has count 1");
                }
            }
            if roles.contains_key(h.role.as_str()) {
                e.add(format!("{p}.role"), format!("duplicate role {:?}", h.role));
                continue;
            }
            let ms = if h.count.unwrap_or(1) <= MAX_COUNT { members(h) } else { vec![] };
            for m in &ms {
                if let Some(other) = member_of.insert(m.clone(), h.role.clone()) {
                    e.add(
                        format!("{p}.role"),
                        format!("host name {m:?} of role {:?} collides with role {other:?}", h.role),
                    );
                }
            }
            roles.insert(&h.role, ms);
        }
        for r in roles.keys() {
            if let Some(other) = member_of.get(*r).filter(|o| o.as_str() != *r) {
                e.add("spec.hosts", format!("role {r:?} collides with a member of role {other:?}"));
            }
        }
        if total > MAX_HOSTS_PER_TEST {
            e.add("spec.hosts", format!("more than {MAX_HOSTS_PER_TEST} hosts in one test"));
        }
        let expanded: Vec<Step> = crate::steps::expand(s).into_iter().map(|x| x.step).collect();
        if expanded.len() > MAX_STEPS {
            e.add("spec.steps", format!("more than {MAX_STEPS} steps (child tests included)"));
        }
        // One process per step and target host: bound the total.
        let processes: usize = expanded
            .iter()
            .map(|st| st.on.iter().map(|r| roles.get(r.as_str()).map_or(1, Vec::len)).sum::<usize>())
            .sum();
        if processes > MAX_PROCESSES {
            e.add("spec.steps", format!("{processes} processes (steps × hosts); at most {MAX_PROCESSES} per test"));
        }
        let level = Level { roles: &roles, member_of: &member_of };
        level.check("spec", &s.steps, &s.tests, 0, &mut e);
        if let Some(cycle) = find_cycle(&expanded) {
            e.add("spec.steps", format!("steps form a cycle through `after`: {}", cycle.join(" -> ")));
        }
        let st = self.status();
        state::<crate::states::TestPhase>("status.phase", &st.phase, &mut e);
        for (i, step) in st.steps.iter().enumerate() {
            state::<crate::states::StepPhase>(format!("status.steps[{i}].phase"), &step.phase, &mut e);
        }
        conditions("status.conditions", &st.conditions, &mut e);
        e.finish()
    }
}

/// What every level of steps and child tests is checked against.
struct Level<'a> {
    roles: &'a HashMap<&'a str, Vec<String>>,
    member_of: &'a HashMap<String, String>,
}

impl Level<'_> {
    /// Steps and child tests of one level; their names share one space.
    fn check(&self, p: &str, steps: &[Step], children: &[crate::ChildTest], depth: usize, e: &mut Errors) {
        if depth > 8 {
            e.add(format!("{p}.tests"), "child tests nest more than 8 deep");
            return;
        }
        let names: BTreeSet<&str> =
            steps.iter().map(|st| st.name.as_str()).chain(children.iter().map(|c| c.name.as_str())).collect();
        let mut seen = BTreeSet::new();
        for (i, st) in steps.iter().enumerate() {
            let sp = format!("{p}.steps[{i}]");
            step(&sp, st, self.roles, self.member_of, &names, e);
            if !seen.insert(st.name.as_str()) {
                e.add(format!("{sp}.name"), format!("duplicate step name {:?}", st.name));
            }
        }
        for (i, c) in children.iter().enumerate() {
            let cp = format!("{p}.tests[{i}]");
            if let Err(msg) = dns_label(&c.name) {
                e.add(format!("{cp}.name"), msg);
            }
            if !seen.insert(c.name.as_str()) {
                e.add(format!("{cp}.name"), format!("duplicate name {:?} (steps and child tests share names)", c.name));
            }
            for (j, a) in c.after.iter().enumerate() {
                if a == &c.name {
                    e.add(format!("{cp}.after[{j}]"), "a child test cannot come after itself");
                } else if !names.contains(a.as_str()) {
                    e.add(format!("{cp}.after[{j}]"), format!("unknown step or child test {a:?}"));
                }
            }
            env(&format!("{cp}.env"), &c.env, e);
            files(&format!("{cp}.files"), &c.files, e);
            if c.steps.is_empty() && c.tests.is_empty() {
                e.add(cp.clone(), "a child test needs steps or child tests");
            }
            self.check(&cp, &c.steps, &c.tests, depth + 1, e);
        }
    }
}

fn step(
    p: &str,
    st: &Step,
    roles: &HashMap<&str, Vec<String>>,
    member_of: &HashMap<String, String>,
    names: &BTreeSet<&str>,
    e: &mut Errors,
) {
    if let Err(msg) = dns_label(&st.name) {
        e.add(format!("{p}.name"), msg);
    }
    if st.on.is_empty() {
        e.add(format!("{p}.on"), "at least one role is required");
    }
    for (j, r) in st.on.iter().enumerate() {
        if !roles.contains_key(r.as_str()) && !member_of.contains_key(r) {
            let mut known: Vec<&str> = roles.keys().copied().collect();
            known.sort();
            e.add(format!("{p}.on[{j}]"), format!("unknown role {r:?} (roles: {})", known.join(", ")));
        }
    }
    for (j, a) in st.after.iter().enumerate() {
        if a == &st.name {
            e.add(format!("{p}.after[{j}]"), "a step cannot come after itself");
        } else if !names.contains(a.as_str()) {
            e.add(format!("{p}.after[{j}]"), format!("unknown step or child test {a:?}"));
        }
    }
    env(&format!("{p}.env"), &st.env, e);
    let run = Runnable {
        argv: &st.argv,
        script: &st.script,
        shell: st.shell,
        timeout: &st.timeout,
        exit_codes: &st.exit_codes,
        files: &st.files,
        stdin_file: st.stdin_file.as_ref(),
        stdin: &st.stdin,
        workdir: &st.workdir,
        stdin_stream: st.stdin_stream,
    };
    run.check(p, e);
    if st.stdin_stream {
        e.add(
            format!("{p}.stdinStream"),
            "only for a command run with Tests.Exec (a step's stdin is stdin or stdinFile)",
        );
    }
    if let Some(n) = st.retry.as_ref().and_then(|r| r.infrastructure) {
        if n > MAX_INFRASTRUCTURE_RETRIES {
            e.add(format!("{p}.retry.infrastructure"), format!("at most {MAX_INFRASTRUCTURE_RETRIES} retries"));
        }
    }
}

/// Most retries a step may ask for when its infrastructure fails.
pub const MAX_INFRASTRUCTURE_RETRIES: u32 = 10;

/// What a step and the Process made of it have in common: one check for
/// both, so a Process created directly (or by `exec`/`cp`) is held to what
/// a test's step is.
struct Runnable<'a> {
    argv: &'a [String],
    script: &'a str,
    shell: bool,
    timeout: &'a str,
    exit_codes: &'a [i32],
    files: &'a [FileRef],
    stdin_file: Option<&'a FileRef>,
    stdin: &'a str,
    workdir: &'a str,
    stdin_stream: bool,
}

impl Runnable<'_> {
    fn check(&self, p: &str, e: &mut Errors) {
        command(p, self.argv, self.script, self.shell, e);
        opt_duration(&format!("{p}.timeout"), self.timeout, e);
        for (j, c) in self.exit_codes.iter().enumerate() {
            if !(0..=255).contains(c) {
                e.add(format!("{p}.exitCodes[{j}]"), "exit codes are 0..255");
            }
        }
        files(&format!("{p}.files"), self.files, e);
        if let Some(f) = self.stdin_file {
            file_ref(&format!("{p}.stdinFile"), f, false, e);
            if !self.stdin.is_empty() {
                e.add(format!("{p}.stdinFile"), "give either stdin or stdinFile, not both");
            }
        }
        if self.stdin_stream && (!self.stdin.is_empty() || self.stdin_file.is_some()) {
            e.add(format!("{p}.stdinStream"), "give stdin, stdinFile or stdinStream, not two");
        }
        if self.stdin.len() > MAX_VALUE_BYTES {
            e.add(format!("{p}.stdin"), format!("larger than {MAX_VALUE_BYTES} bytes"));
        }
        if self.workdir.contains('\0') || self.workdir.len() > 4096 {
            e.add(format!("{p}.workdir"), "must be at most 4096 bytes without NUL");
        }
    }
}

/// A name in a Process's env: a variable name, or a claim's host variable
/// `host_<member>_<var>` (members may hold '-'). Never '=' or NUL, which
/// would change what the process sees.
pub fn process_env_name(s: &str) -> Result<(), NameError> {
    if let Some(rest) = s.strip_prefix("host_") {
        let ok = !rest.is_empty()
            && s.len() <= 256
            && rest.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-');
        return if ok { Ok(()) } else { Err(NameError::NotHostVariable(s.to_string())) };
    }
    env_name(s)
}

/// A cycle in the `after` graph, as step names, if there is one.
fn find_cycle(steps: &[Step]) -> Option<Vec<String>> {
    let idx: HashMap<&str, usize> = steps.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
    // 0 unvisited, 1 on the stack, 2 done.
    let mut state = vec![0u8; steps.len()];
    let mut stack: Vec<usize> = Vec::new();
    fn visit(
        i: usize,
        steps: &[Step],
        idx: &HashMap<&str, usize>,
        state: &mut [u8],
        stack: &mut Vec<usize>,
    ) -> Option<Vec<String>> {
        state[i] = 1;
        stack.push(i);
        for a in &steps[i].after {
            let Some(&j) = idx.get(a.as_str()) else {
                continue;
            };
            if j == i {
                continue; // reported as "after itself"
            }
            if state[j] == 1 {
                let from = stack.iter().position(|&k| k == j).unwrap_or(0);
                let mut c: Vec<String> = stack[from..].iter().map(|&k| steps[k].name.clone()).collect();
                c.push(steps[j].name.clone());
                return Some(c);
            }
            if state[j] == 0 {
                if let Some(c) = visit(j, steps, idx, state, stack) {
                    return Some(c);
                }
            }
        }
        stack.pop();
        state[i] = 2;
        None
    }
    for i in 0..steps.len() {
        if state[i] == 0 {
            if let Some(c) = visit(i, steps, &idx, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

impl Validate for Host {
    fn validate(&self) -> Result<(), ValidationErrors> {
        let mut e = Errors::default();
        meta(self.meta(), &mut e);
        if self.meta().name.is_empty() && !self.meta().generate_name.is_empty() {
            e.add("metadata.name", "hosts are named by their agent; generateName is not allowed");
        }
        let s = self.spec();
        capabilities("spec.capabilities", &s.capabilities, &mut e);
        env("spec.env", &s.env, &mut e);
        files("spec.files", &s.files, &mut e);
        let st = self.status();
        capabilities("status.capabilities", &st.capabilities, &mut e);
        // What the agent publishes becomes every test's env on this host
        // (and `host_<member>_<var>` names): a name no process could be
        // given is refused here, not found later by a test that never runs.
        env("status.env", &st.env, &mut e);
        state::<crate::states::HostPhase>("status.phase", &st.phase, &mut e);
        conditions("status.conditions", &st.conditions, &mut e);
        if st.agent_id.len() > MAX_NAME || !st.agent_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            e.add("status.agentId", format!("at most {MAX_NAME} of [A-Za-z0-9-]"));
        }
        // Unclaimed is no claim at all: one encoding, not an empty one too.
        if let Some(c) = &st.claim {
            if c.test.is_empty() || c.test_uid.is_empty() {
                e.add("status.claim", "a claim names its test and testUid; an unclaimed host has no claim");
            }
        }
        vars("status.vars", &st.vars, &mut e);
        e.finish()
    }
}

/// Largest `max` of a pool: guests on one libvirt host.
pub const MAX_POOL_GUESTS: u32 = 64;

impl Validate for HostPool {
    fn validate(&self) -> Result<(), ValidationErrors> {
        let mut e = Errors::default();
        meta(self.meta(), &mut e);
        let s = self.spec();
        let provider = s.provider.as_str();
        match provider {
            "libvirt" | "podman" | "kubernetes" => {}
            "" => e.add("spec.provider", "required (known: libvirt, podman, kubernetes)"),
            p => e.add("spec.provider", format!("unknown provider {p:?} (known: libvirt, podman, kubernetes)")),
        }
        let (libvirt, kubernetes) = (provider == "libvirt", provider == "kubernetes");
        // Its guests are named NAME-xxxxx, and each is a Host (a DNS label).
        if self.meta().name.len() > MAX_NAME - 6 {
            e.add(
                "metadata.name",
                format!("a pool's name is at most {} bytes: its guests are NAME-xxxxx", MAX_NAME - 6),
            );
        }
        if kubernetes {
            if s.address.is_empty() {
                e.add(
                    "spec.address",
                    "required: HOST:PORT where the pods' agents reach the control plane's TLS listener",
                );
            } else if let Err(why) = crate::pool::check_address(&s.address) {
                e.add("spec.address", why);
            }
            if !s.namespace.is_empty() {
                if let Err(msg) = dns_label(&s.namespace) {
                    e.add("spec.namespace", msg);
                }
            }
            if !s.pod_template.is_empty() {
                if let Err(why) = crate::pool::check_pod_template(&s.pod_template) {
                    e.add("spec.podTemplate", why);
                }
            }
        } else {
            for (field, set) in [
                ("spec.address", !s.address.is_empty()),
                ("spec.namespace", !s.namespace.is_empty()),
                ("spec.podTemplate", !s.pod_template.is_empty()),
            ] {
                if set {
                    e.add(field, "only for provider kubernetes");
                }
            }
        }
        if !s.uri.is_empty() {
            if !libvirt {
                e.add("spec.uri", "a libvirt URI: only for provider libvirt");
            } else if let Err(why) = crate::pool::check_uri(&s.uri) {
                e.add("spec.uri", why.to_string());
            }
        }
        if provider == "podman" || kubernetes {
            if let Err(why) = crate::pool::check_image_name(&s.image) {
                e.add("spec.image", why);
            }
        } else if s.image.is_empty() {
            e.add("spec.image", "required: the directory hack/guest-image made (vmlinuz, initrd.img, golden.qcow2)");
        } else if !s.image.starts_with('/') || s.image.len() > 4096 || s.image.contains('\0') {
            e.add("spec.image", "must be an absolute path");
        }
        capabilities("spec.capabilities", &s.capabilities, &mut e);
        labels("spec.labels", &s.labels, &mut e);
        vars("spec.vars", &s.vars, &mut e);
        let on_cmdline = crate::pool::kernel_args(&crate::pool::agent_args(self, true)).len();
        if libvirt && on_cmdline > crate::pool::MAX_KERNEL_ARGS {
            e.add(
                "spec.vars",
                format!(
                    "the pool's capabilities, labels and vars take {on_cmdline} bytes on each guest's kernel command \
                     line, at most {} (the kernel takes 2048 in all)",
                    crate::pool::MAX_KERNEL_ARGS
                ),
            );
        }
        env("spec.env", &s.env, &mut e);
        files("spec.files", &s.files, &mut e);
        if s.memory != 0 && !(64..=65_536).contains(&s.memory) {
            e.add("spec.memory", "MiB per guest: 64 to 65536 (default 256)");
        }
        if s.cpus > 64 {
            e.add("spec.cpus", "vCPUs per guest: 1 to 64 (default 1)");
        }
        if s.pids != 0 && !(provider == "podman" && (16..=65_536).contains(&s.pids)) {
            e.add("spec.pids", "processes per container: 16 to 65536 (default 1024), for provider podman only");
        }
        let max = s.max.unwrap_or(MAX_POOL_GUESTS.min(8));
        if s.max == Some(0) || max > MAX_POOL_GUESTS {
            e.add("spec.max", format!("1 to {MAX_POOL_GUESTS}"));
        }
        if s.min > max {
            e.add("spec.min", format!("must be at most spec.max ({max})"));
        }
        opt_duration("spec.idleTimeout", &s.idle_timeout, &mut e);
        if !s.boot_timeout.is_empty() {
            match duration::parse(&s.boot_timeout) {
                Ok(d) if (std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(3600)).contains(&d) => {}
                Ok(_) => e.add("spec.bootTimeout", "1s to 1h (default 3m)"),
                Err(err) => e.add("spec.bootTimeout", err.to_string()),
            }
        }
        if !s.link.is_empty() && !libvirt {
            e.add("spec.link", "how a libvirt guest is linked: only for provider libvirt");
        } else if !matches!(s.link.as_str(), "" | "serial" | "vsock") {
            e.add("spec.link", format!("{:?} is not serial or vsock", s.link));
        } else if s.link == "vsock" && crate::pool::is_remote_uri(&s.uri) {
            // Its device (vhost-device-vsock) runs next to the control plane.
            e.add("spec.link", "vsock needs a local libvirt (spec.uri names another machine): use serial");
        }
        if !s.network.is_empty() {
            if kubernetes {
                e.add("spec.network", "a pool network is for providers libvirt and podman (pods use the cluster's)");
            } else if let Err(msg) = dns_label(&s.network) {
                e.add("spec.network", msg);
            }
        }
        conditions("status.conditions", &self.status().conditions, &mut e);
        e.finish()
    }
}

impl Validate for Process {
    fn validate(&self) -> Result<(), ValidationErrors> {
        let mut e = Errors::default();
        meta(self.meta(), &mut e);
        let s = self.spec();
        if let Err(msg) = dns_label(&s.host_name) {
            e.add("spec.hostName", msg);
        }
        let run = Runnable {
            argv: &s.argv,
            script: &s.script,
            shell: s.shell,
            timeout: &s.timeout,
            exit_codes: &s.exit_codes,
            files: &s.files,
            stdin_file: s.stdin_file.as_ref(),
            stdin: &s.stdin,
            workdir: &s.workdir,
            stdin_stream: s.stdin_stream,
        };
        run.check("spec", &mut e);
        if s.env.len() > MAX_ENV_ENTRIES {
            e.add("spec.env", format!("more than {MAX_ENV_ENTRIES} entries"));
        }
        for (k, v) in &s.env {
            if let Err(msg) = process_env_name(k) {
                e.add(format!("spec.env.{k}"), msg);
            }
            if v.contains('\0') {
                e.add(format!("spec.env.{k}"), "must not contain NUL");
            }
        }
        if !s.stop_grace.is_empty() {
            match duration::parse(&s.stop_grace) {
                Ok(d) if d <= MAX_STOP_GRACE => {}
                Ok(_) => e.add("spec.stopGrace", "at most 10m (default 2s)"),
                Err(err) => e.add("spec.stopGrace", err.to_string()),
            }
        }
        state::<crate::states::ProcessPhase>("status.phase", &self.status().phase, &mut e);
        e.finish()
    }
}

/// The longest a stopped process may have between SIGTERM and SIGKILL.
pub const MAX_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

#[cfg(test)]
mod tests {
    use super::*;

    /// A bad name says which rule it breaks, typed, in the words every
    /// caller showed before (`metadata.name: …`).
    #[test]
    fn names_are_refused_with_a_typed_reason() {
        assert_eq!(dns_label(""), Err(NameError::Empty));
        assert_eq!(dns_label(&"a".repeat(64)), Err(NameError::TooLong(MAX_NAME)));
        let e = dns_label("Bad_Name").unwrap_err();
        assert_eq!(e, NameError::NotDnsLabel("Bad_Name".into()));
        assert!(e.to_string().starts_with("\"Bad_Name\" is not a DNS label"), "{e}");
        assert_eq!(env_name("1x"), Err(NameError::NotVariable("1x".into())));
        assert_eq!(process_env_name("host_"), Err(NameError::NotHostVariable("host_".into())));
        assert!(process_env_name("host_server-1_ip").is_ok());
        assert_eq!(sync_key("a b"), Err(NameError::NotSyncKey("a b".into())));
    }
    use crate::manifest;
    use crate::Object;

    fn test_errors(yaml: &str) -> Vec<String> {
        let objs = manifest::parse("t", yaml).unwrap();
        let Object::Test(t) = &objs[0] else { panic!() };
        match t.validate() {
            Ok(()) => vec![],
            Err(e) => e.0.iter().map(|f| f.to_string()).collect(),
        }
    }

    const HEAD: &str = "apiVersion: testbus/v1\nkind: Test\nmetadata: {name: t}\n";

    #[test]
    fn states_a_controller_could_not_write_are_refused() {
        let mut t = match &manifest::parse(
            "t",
            &format!("{HEAD}spec:\n  hosts: [{{role: a}}]\n  steps: [{{name: s, on: [a], argv: [\"true\"]}}]\n"),
        )
        .unwrap()[0]
        {
            Object::Test(t) => t.clone(),
            _ => unreachable!(),
        };
        assert!(t.validate().is_ok());
        t.status_mut().phase = "Runing".into();
        t.status_mut().steps.push(crate::StepStatus { name: "s".into(), phase: "Done".into(), ..Default::default() });
        let errs: Vec<String> = t.validate().unwrap_err().0.iter().map(|f| f.to_string()).collect();
        assert!(errs.iter().any(|e| e.starts_with("status.phase: \"Runing\" is not a test phase")), "{errs:?}");
        assert!(errs.iter().any(|e| e.starts_with("status.steps[0].phase: \"Done\" is not a step phase")), "{errs:?}");
        let mut h = crate::Host::default();
        h.meta_mut().name = "h".into();
        h.status_mut().claim = Some(crate::HostClaim::default());
        let errs: Vec<String> = h.validate().unwrap_err().0.iter().map(|f| f.to_string()).collect();
        assert!(errs.iter().any(|e| e.starts_with("status.claim: a claim names its test")), "{errs:?}");
    }

    #[test]
    fn count_zero_names_the_field() {
        let errs = test_errors(&format!(
            "{HEAD}spec:\n  hosts: [{{role: a}}, {{role: b, count: 0}}]\n  steps: [{{name: s, on: [a], argv: [\"true\"]}}]\n"
        ));
        assert_eq!(errs, vec!["spec.hosts[1].count: must be >= 1"]);
    }

    #[test]
    fn duplicate_roles_and_member_collisions() {
        let errs = test_errors(&format!("{HEAD}spec:\n  hosts: [{{role: a}}, {{role: a}}]\n"));
        assert!(errs.iter().any(|e| e.starts_with("spec.hosts[1].role: duplicate role")), "{errs:?}");
        let errs = test_errors(&format!("{HEAD}spec:\n  hosts: [{{role: c, count: 2}}, {{role: c1}}]\n"));
        assert!(errs.iter().any(|e| e.contains("collides")), "{errs:?}");
    }

    #[test]
    fn bad_names_unknown_roles_and_cycles() {
        let errs = test_errors(
            "apiVersion: testbus/v1\nkind: Test\nmetadata: {name: Bad_Name}\nspec:\n  hosts: [{role: a}]\n  steps:\n    - {name: x, on: [zz], after: [y], argv: [\"true\"]}\n    - {name: y, on: [a], after: [x], argv: [\"true\"]}\n",
        );
        assert!(errs.iter().any(|e| e.starts_with("metadata.name:")), "{errs:?}");
        assert!(errs.iter().any(|e| e.starts_with("spec.steps[0].on[0]: unknown role \"zz\"")), "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("cycle")), "{errs:?}");
    }

    #[test]
    fn valid_members_are_accepted() {
        let errs = test_errors(&format!(
            "{HEAD}spec:\n  hosts: [{{role: server}}, {{role: client, count: 3}}]\n  steps:\n    - {{name: a, on: [server], argv: [\"true\"]}}\n    - {{name: b, on: [client2], after: [a], script: \"echo\"}}\n"
        ));
        assert!(errs.is_empty(), "{errs:?}");
    }

    #[test]
    fn command_shape() {
        let errs = test_errors(&format!("{HEAD}spec:\n  hosts: [{{role: a}}]\n  steps: [{{name: s, on: [a]}}]\n"));
        assert_eq!(errs, vec!["spec.steps[0]: one of argv or script is required"]);
    }
}
