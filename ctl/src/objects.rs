//! Verbs on an object of any kind, for commands that take KIND arguments.
use crate::error::{CliError, CliResult};
use testbus_client::{ApiResource, Client};
use testbus_proto::{Host, HostPool, Kind, Object, Process, Resource, Test};
use tonic::Code;

pub fn parse_kind(s: &str) -> CliResult<Kind> {
    Kind::parse(s).ok_or_else(|| {
        const NAMES: [&str; 8] = ["host", "hosts", "test", "tests", "process", "processes", "hostpool", "hostpools"];
        let near = NAMES
            .iter()
            .map(|n| (strsim::damerau_levenshtein(&s.to_ascii_lowercase(), n), *n))
            .filter(|(d, _)| *d <= 2)
            .min()
            .map(|(_, n)| format!("; did you mean {n}?"))
            .unwrap_or_default();
        CliError::usage(format!("unknown kind {s:?} (expected host(s), test(s), process(es), hostpool(s)){near}"))
    })
}

/// `test/NAME` → (Test, NAME).
pub fn parse_ref(s: &str, allowed: &[Kind]) -> CliResult<(Kind, String)> {
    let (k, n) =
        s.split_once('/').ok_or_else(|| CliError::usage(format!("{s:?}: expected KIND/NAME, e.g. test/NAME")))?;
    let kind = parse_kind(k)?;
    if !allowed.contains(&kind) || n.is_empty() {
        let names: Vec<&str> = allowed.iter().map(|k| crate::format::kind_slug(*k)).collect();
        return Err(CliError::usage(format!("{s:?}: expected {}/NAME", names.join("/NAME or "))));
    }
    Ok((kind, n.to_string()))
}

/// A test named as `NAME` or `test/NAME`: every command that takes a test
/// takes both (`results` wanted the second, `exec` the first).
pub fn test_name(s: &str) -> CliResult<String> {
    if s.contains('/') {
        Ok(parse_ref(s, &[Kind::Test])?.1)
    } else {
        Ok(s.to_string())
    }
}

pub async fn get(client: &Client, kind: Kind, name: &str) -> CliResult<Object> {
    async fn one<K: ApiResource>(c: &Client, name: &str) -> CliResult<Object> {
        Ok(c.api::<K>().get(name).await?.into_object())
    }
    match kind {
        Kind::Host => one::<Host>(client, name).await,
        Kind::Test => one::<Test>(client, name).await,
        Kind::Process => one::<Process>(client, name).await,
        Kind::HostPool => one::<HostPool>(client, name).await,
    }
}

pub async fn list(client: &Client, kind: Kind, labels: &str, fields: &str) -> CliResult<(Vec<Object>, String)> {
    async fn all<K: ApiResource>(c: &Client, l: &str, f: &str) -> CliResult<(Vec<Object>, String)> {
        let (items, rv) = c.api::<K>().list(l, f).await?;
        let mut objs: Vec<Object> = items.into_iter().map(Resource::into_object).collect();
        objs.sort_by(|a, b| a.meta().name.cmp(&b.meta().name));
        Ok((objs, rv))
    }
    match kind {
        Kind::Host => all::<Host>(client, labels, fields).await,
        Kind::Test => all::<Test>(client, labels, fields).await,
        Kind::Process => all::<Process>(client, labels, fields).await,
        Kind::HostPool => all::<HostPool>(client, labels, fields).await,
    }
}

pub async fn delete(client: &Client, kind: Kind, name: &str) -> CliResult<()> {
    match kind {
        Kind::Host => client.api::<Host>().delete(name).await.map(|_| ()),
        Kind::Test => client.api::<Test>().delete(name).await.map(|_| ()),
        Kind::Process => client.api::<Process>().delete(name).await.map(|_| ()),
        Kind::HostPool => client.api::<HostPool>().delete(name).await.map(|_| ()),
    }
    .map_err(CliError::from)
}

/// What `apply` did to one object.
pub enum Applied {
    Created(Object),
    Configured(Object),
    Unchanged(Object),
}

/// Creates the object, or updates the existing one of that name.
pub async fn apply(client: &Client, obj: Object) -> CliResult<Applied> {
    async fn one<K: ApiResource>(c: &Client, mut o: K) -> CliResult<Applied> {
        let api = c.api::<K>();
        if !o.name().is_empty() {
            if let Some(cur) = api.get_opt(o.name()).await? {
                // The manifest's labels and annotations are added to the
                // object's (an agent's own labels stay).
                let mut next = cur.clone();
                *next.spec_mut() = o.spec().clone();
                next.meta_mut().labels.extend(o.meta().labels.clone());
                next.meta_mut().annotations.extend(o.meta().annotations.clone());
                if next == cur {
                    return Ok(Applied::Unchanged(cur.into_object()));
                }
                return Ok(Applied::Configured(api.update(next).await?.into_object()));
            }
        }
        o.status_mut().clone_from(&Default::default());
        match api.create(o).await {
            Ok(o) => Ok(Applied::Created(o.into_object())),
            Err(s) if s.code() == Code::AlreadyExists => Err(CliError::usage(s.message().to_string())),
            Err(s) => Err(s.into()),
        }
    }
    match obj {
        Object::Host(o) => one(client, o).await,
        Object::Test(o) => one(client, o).await,
        Object::Process(o) => one(client, o).await,
        Object::HostPool(o) => one(client, o).await,
    }
}
