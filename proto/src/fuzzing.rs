//! The bodies of the fuzz targets (fuzz/fuzz_targets/*): each takes
//! arbitrary bytes and must not panic; where a property is cheap to state it
//! is asserted. The same functions replay the saved inputs in
//! `fuzz/regressions/` as ordinary tests.
use crate::validate::Validate;
use crate::*;
use prost::Message;
use std::collections::BTreeMap;

/// YAML/JSON manifests: parse, then validate whatever parsed.
pub fn manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(objs) = crate::manifest::parse("fuzz", text) {
        for o in objs {
            let _ = o.validate();
            let _ = o.to_json();
            if let Object::Test(t) = &o {
                let _ = crate::steps::expand(t.spec());
            }
        }
    }
}

/// Every request message the API decodes.
pub fn decode(data: &[u8]) {
    macro_rules! each {
        ($($ty:ty),*) => {$(
            let _ = <$ty>::decode(data);
        )*};
    }
    each!(
        GetRequest,
        ListRequest,
        WatchRequest,
        DeleteRequest,
        RenewLeaseRequest,
        ClaimRequest,
        SetEnvRequest,
        RecordResultRequest,
        FinishRequest,
        OutputChunk,
        ReadOutputRequest,
        BarrierRequest,
        SendRequest,
        RecvRequest,
        UploadRequest,
        StatBlobRequest,
        DownloadRequest
    );
    if let Ok(t) = Test::decode(data) {
        let _ = t.validate();
        let _ = crate::steps::expand(t.spec());
        let _ = crate::validate::file_refs_of_test(&t);
    }
    if let Ok(p) = HostPool::decode(data) {
        let _ = p.validate();
    }
    if let Ok(h) = Host::decode(data) {
        let _ = h.validate();
    }
    if let Ok(p) = Process::decode(data) {
        let _ = p.validate();
    }
}

/// `${}` substitution: the first line is the template, the rest NAME=VALUE.
pub fn subst(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut lines = text.split('\n');
    let template = lines.next().unwrap_or_default();
    let env: BTreeMap<String, String> =
        lines.filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    if let Ok(out) = crate::subst::substitute(template, &env) {
        // Without any `$`, substitution changes nothing.
        if !template.contains('$') {
            assert_eq!(out, template);
        }
    }
}

/// Durations: whatever parses formats back to the same value.
pub fn duration(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(d) = crate::duration::parse(text) {
        assert_eq!(crate::duration::parse(&crate::duration::format(d)), Ok(d));
    }
}

/// A fuzz target: a name and what it runs on one input.
pub type Target = (&'static str, fn(&[u8]));

/// The targets by name, for replaying saved inputs.
pub const TARGETS: [Target; 4] = [("manifest", manifest), ("decode", decode), ("subst", subst), ("duration", duration)];
