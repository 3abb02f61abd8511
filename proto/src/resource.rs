//! What every kind has in common. The server's handlers, the typed client
//! and the controller runtime are generic over [`Resource`]; the kinds
//! implement it through one macro, so a verb behaves the same for all kinds.
use crate::{Host, HostPool, ObjectMeta, Process, Test};
use serde::{de::DeserializeOwned, Serialize};
use std::fmt;

/// A stored value that is not an object of the kind its key says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid stored object: {0}")]
pub struct DecodeError(pub String);

pub trait Resource:
    prost::Message + Default + Clone + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static
{
    const KIND: Kind;
    type Spec: prost::Message + Default + Clone + PartialEq;
    type Status: prost::Message + Default + Clone + PartialEq;

    fn meta(&self) -> &ObjectMeta;
    fn meta_mut(&mut self) -> &mut ObjectMeta;
    fn spec(&self) -> &Self::Spec;
    fn spec_mut(&mut self) -> &mut Self::Spec;
    fn status(&self) -> &Self::Status;
    fn status_mut(&mut self) -> &mut Self::Status;
    fn type_meta_mut(&mut self) -> (&mut String, &mut String);

    fn name(&self) -> &str {
        self.meta().name.as_str()
    }
    fn resource_version(&self) -> &str {
        self.meta().resource_version.as_str()
    }
    /// The value a watch or list may be indexed by (Processes: their host).
    fn index_value(&self) -> Option<&str> {
        None
    }
    /// Fills apiVersion and kind.
    fn with_type_meta(mut self) -> Self {
        let (api_version, kind) = self.type_meta_mut();
        *api_version = crate::API_VERSION.to_string();
        *kind = Self::KIND.name().to_string();
        self
    }
    fn into_object(self) -> Object;

    /// The stored form of the object: its protobuf encoding, without its
    /// resourceVersion (the store's revision of the write, not part of the
    /// value). With [`Resource::from_stored`], the only way other crates
    /// turn objects into bytes and back.
    fn to_stored(&self) -> Vec<u8> {
        let mut o = self.clone();
        o.meta_mut().resource_version.clear();
        prost::Message::encode_to_vec(&o)
    }

    /// An object from its stored form, with resourceVersion set to the
    /// store revision of its last write.
    fn from_stored(bytes: &[u8], revision: u64) -> Result<Self, DecodeError> {
        let mut o = <Self as prost::Message>::decode(bytes).map_err(|e| DecodeError(e.to_string()))?;
        o.meta_mut().resource_version = revision.to_string();
        Ok(o)
    }
}

macro_rules! resource {
    ($ty:ident, $spec:ident, $status:ident, $kind:expr, $($index:tt)*) => {
        impl Resource for $ty {
            const KIND: Kind = $kind;
            type Spec = crate::$spec;
            type Status = crate::$status;
            fn meta(&self) -> &ObjectMeta {
                self.metadata.as_ref().unwrap_or(&EMPTY_META)
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                self.metadata.get_or_insert_with(Default::default)
            }
            fn spec(&self) -> &Self::Spec {
                static EMPTY: std::sync::LazyLock<crate::$spec> = std::sync::LazyLock::new(Default::default);
                self.spec.as_ref().unwrap_or(&EMPTY)
            }
            fn spec_mut(&mut self) -> &mut Self::Spec {
                self.spec.get_or_insert_with(Default::default)
            }
            fn status(&self) -> &Self::Status {
                static EMPTY: std::sync::LazyLock<crate::$status> = std::sync::LazyLock::new(Default::default);
                self.status.as_ref().unwrap_or(&EMPTY)
            }
            fn status_mut(&mut self) -> &mut Self::Status {
                self.status.get_or_insert_with(Default::default)
            }
            fn type_meta_mut(&mut self) -> (&mut String, &mut String) {
                (&mut self.api_version, &mut self.kind)
            }
            fn into_object(self) -> Object {
                Object::$ty(self)
            }
            $($index)*
        }
    };
}

static EMPTY_META: ObjectMeta = ObjectMeta {
    name: String::new(),
    generate_name: String::new(),
    uid: String::new(),
    labels: std::collections::BTreeMap::new(),
    annotations: std::collections::BTreeMap::new(),
    resource_version: String::new(),
    generation: 0,
    creation_timestamp: String::new(),
    deletion_timestamp: String::new(),
    finalizers: Vec::new(),
    owner_references: Vec::new(),
};

resource!(Host, HostSpec, HostStatus, Kind::Host,);
resource!(Test, TestSpec, TestStatus, Kind::Test,);
resource!(HostPool, HostPoolSpec, HostPoolStatus, Kind::HostPool,);
resource!(
    Process,
    ProcessSpec,
    ProcessStatus,
    Kind::Process,
    fn index_value(&self) -> Option<&str> {
        Some(self.spec().host_name.as_str())
    }
);

/// The kinds of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Host,
    Test,
    Process,
    HostPool,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Host, Kind::Test, Kind::Process, Kind::HostPool];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Host => "Host",
            Kind::Test => "Test",
            Kind::Process => "Process",
            Kind::HostPool => "HostPool",
        }
    }
    /// Lower-case plural, used in store keys and CLI output.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Host => "hosts",
            Kind::Test => "tests",
            Kind::Process => "processes",
            Kind::HostPool => "hostpools",
        }
    }
    /// Accepts what the CLI contract allows: `host`, `hosts`, `Host`, ...
    pub fn parse(s: &str) -> Option<Kind> {
        let l = s.to_ascii_lowercase();
        Kind::ALL.into_iter().find(|k| l == k.name().to_ascii_lowercase() || l == k.plural())
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An object of any kind, as read from a manifest.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Host(Host),
    Test(Test),
    Process(Process),
    HostPool(HostPool),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Host(_) => Kind::Host,
            Object::Test(_) => Kind::Test,
            Object::Process(_) => Kind::Process,
            Object::HostPool(_) => Kind::HostPool,
        }
    }
    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Host(o) => o.meta(),
            Object::Test(o) => o.meta(),
            Object::Process(o) => o.meta(),
            Object::HostPool(o) => o.meta(),
        }
    }
    pub fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::Host(o) => o.meta_mut(),
            Object::Test(o) => o.meta_mut(),
            Object::Process(o) => o.meta_mut(),
            Object::HostPool(o) => o.meta_mut(),
        }
    }
    /// Validates the object as its kind does.
    pub fn validate(&self) -> Result<(), crate::validate::ValidationErrors> {
        use crate::validate::Validate;
        match self {
            Object::Host(o) => o.validate(),
            Object::Test(o) => o.validate(),
            Object::Process(o) => o.validate(),
            Object::HostPool(o) => o.validate(),
        }
    }
    pub fn to_json(&self) -> serde_json::Value {
        let v = match self {
            Object::Host(o) => serde_json::to_value(o),
            Object::Test(o) => serde_json::to_value(o),
            Object::Process(o) => serde_json::to_value(o),
            Object::HostPool(o) => serde_json::to_value(o),
        };
        crate::manifest::prune(v.unwrap_or_default())
    }
}
