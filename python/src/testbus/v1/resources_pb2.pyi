from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Attempt(_message.Message):
    __slots__ = ["claims", "finish_time", "hosts", "message", "number", "reason", "start_time"]
    class ClaimsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    FINISH_TIME_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    claims: _containers.ScalarMap[str, str]
    finish_time: str
    hosts: _containers.RepeatedScalarFieldContainer[str]
    message: str
    number: int
    reason: str
    start_time: str
    def __init__(self, number: _Optional[int] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., hosts: _Optional[_Iterable[str]] = ..., start_time: _Optional[str] = ..., finish_time: _Optional[str] = ..., claims: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ChildTest(_message.Message):
    __slots__ = ["after", "env", "files", "name", "steps", "tests"]
    class EnvEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AFTER_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TESTS_FIELD_NUMBER: _ClassVar[int]
    after: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    files: _containers.RepeatedCompositeFieldContainer[FileRef]
    name: str
    steps: _containers.RepeatedCompositeFieldContainer[Step]
    tests: _containers.RepeatedCompositeFieldContainer[ChildTest]
    def __init__(self, name: _Optional[str] = ..., after: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., files: _Optional[_Iterable[_Union[FileRef, _Mapping]]] = ..., steps: _Optional[_Iterable[_Union[Step, _Mapping]]] = ..., tests: _Optional[_Iterable[_Union[ChildTest, _Mapping]]] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ["last_transition_time", "message", "reason", "status", "type"]
    LAST_TRANSITION_TIME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    last_transition_time: str
    message: str
    reason: str
    status: str
    type: str
    def __init__(self, type: _Optional[str] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., last_transition_time: _Optional[str] = ...) -> None: ...

class FileRef(_message.Message):
    __slots__ = ["digest", "env", "mode", "path", "source"]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    digest: str
    env: str
    mode: str
    path: str
    source: str
    def __init__(self, source: _Optional[str] = ..., digest: _Optional[str] = ..., path: _Optional[str] = ..., env: _Optional[str] = ..., mode: _Optional[str] = ...) -> None: ...

class Guest(_message.Message):
    __slots__ = ["address", "cleanings", "created", "idle_since", "message", "name", "phase"]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CLEANINGS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    IDLE_SINCE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    address: str
    cleanings: int
    created: str
    idle_since: str
    message: str
    name: str
    phase: str
    def __init__(self, name: _Optional[str] = ..., phase: _Optional[str] = ..., message: _Optional[str] = ..., address: _Optional[str] = ..., created: _Optional[str] = ..., idle_since: _Optional[str] = ..., cleanings: _Optional[int] = ...) -> None: ...

class Host(_message.Message):
    __slots__ = ["api_version", "kind", "metadata", "spec", "status"]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    api_version: str
    kind: str
    metadata: ObjectMeta
    spec: HostSpec
    status: HostStatus
    def __init__(self, api_version: _Optional[str] = ..., kind: _Optional[str] = ..., metadata: _Optional[_Union[ObjectMeta, _Mapping]] = ..., spec: _Optional[_Union[HostSpec, _Mapping]] = ..., status: _Optional[_Union[HostStatus, _Mapping]] = ...) -> None: ...

class HostClaim(_message.Message):
    __slots__ = ["role", "test", "test_uid"]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    TEST_UID_FIELD_NUMBER: _ClassVar[int]
    role: str
    test: str
    test_uid: str
    def __init__(self, test: _Optional[str] = ..., test_uid: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class HostFacts(_message.Message):
    __slots__ = ["agent_version", "arch", "cpus", "hostname", "kernel", "memory_bytes", "os", "transport"]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    arch: str
    cpus: int
    hostname: str
    kernel: str
    memory_bytes: int
    os: str
    transport: str
    def __init__(self, os: _Optional[str] = ..., kernel: _Optional[str] = ..., arch: _Optional[str] = ..., cpus: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., agent_version: _Optional[str] = ..., transport: _Optional[str] = ..., hostname: _Optional[str] = ...) -> None: ...

class HostPool(_message.Message):
    __slots__ = ["api_version", "kind", "metadata", "spec", "status"]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    api_version: str
    kind: str
    metadata: ObjectMeta
    spec: HostPoolSpec
    status: HostPoolStatus
    def __init__(self, api_version: _Optional[str] = ..., kind: _Optional[str] = ..., metadata: _Optional[_Union[ObjectMeta, _Mapping]] = ..., spec: _Optional[_Union[HostPoolSpec, _Mapping]] = ..., status: _Optional[_Union[HostPoolStatus, _Mapping]] = ...) -> None: ...

class HostPoolSpec(_message.Message):
    __slots__ = ["address", "boot_timeout", "capabilities", "cpus", "env", "files", "idle_timeout", "image", "labels", "link", "max", "memory", "min", "namespace", "network", "pids", "pod_template", "provider", "uri", "vars"]
    class EnvEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class VarsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BOOT_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    POD_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    VARS_FIELD_NUMBER: _ClassVar[int]
    address: str
    boot_timeout: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    cpus: int
    env: _containers.ScalarMap[str, str]
    files: _containers.RepeatedCompositeFieldContainer[FileRef]
    idle_timeout: str
    image: str
    labels: _containers.ScalarMap[str, str]
    link: str
    max: int
    memory: int
    min: int
    namespace: str
    network: str
    pids: int
    pod_template: str
    provider: str
    uri: str
    vars: _containers.ScalarMap[str, str]
    def __init__(self, provider: _Optional[str] = ..., uri: _Optional[str] = ..., image: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., vars: _Optional[_Mapping[str, str]] = ..., env: _Optional[_Mapping[str, str]] = ..., files: _Optional[_Iterable[_Union[FileRef, _Mapping]]] = ..., memory: _Optional[int] = ..., cpus: _Optional[int] = ..., min: _Optional[int] = ..., max: _Optional[int] = ..., idle_timeout: _Optional[str] = ..., network: _Optional[str] = ..., boot_timeout: _Optional[str] = ..., link: _Optional[str] = ..., pids: _Optional[int] = ..., namespace: _Optional[str] = ..., address: _Optional[str] = ..., pod_template: _Optional[str] = ...) -> None: ...

class HostPoolStatus(_message.Message):
    __slots__ = ["conditions", "guests", "message", "observed_generation"]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    GUESTS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    conditions: _containers.RepeatedCompositeFieldContainer[Condition]
    guests: _containers.RepeatedCompositeFieldContainer[Guest]
    message: str
    observed_generation: int
    def __init__(self, guests: _Optional[_Iterable[_Union[Guest, _Mapping]]] = ..., conditions: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ..., observed_generation: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class HostRequirement(_message.Message):
    __slots__ = ["capabilities", "count", "host", "role", "selector"]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    count: int
    host: str
    role: str
    selector: str
    def __init__(self, role: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., count: _Optional[int] = ..., host: _Optional[str] = ..., selector: _Optional[str] = ...) -> None: ...

class HostSpec(_message.Message):
    __slots__ = ["capabilities", "env", "files", "pool", "unschedulable", "unschedulable_reason"]
    class EnvEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    UNSCHEDULABLE_FIELD_NUMBER: _ClassVar[int]
    UNSCHEDULABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    files: _containers.RepeatedCompositeFieldContainer[FileRef]
    pool: str
    unschedulable: bool
    unschedulable_reason: str
    def __init__(self, capabilities: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., files: _Optional[_Iterable[_Union[FileRef, _Mapping]]] = ..., unschedulable: bool = ..., unschedulable_reason: _Optional[str] = ..., pool: _Optional[str] = ...) -> None: ...

class HostStatus(_message.Message):
    __slots__ = ["agent_id", "capabilities", "claim", "conditions", "env", "facts", "infra_failures", "lease_duration_seconds", "lease_renew_time", "message", "observed_generation", "phase", "vars"]
    class EnvEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class VarsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    INFRA_FAILURES_FIELD_NUMBER: _ClassVar[int]
    LEASE_DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_RENEW_TIME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    VARS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    claim: HostClaim
    conditions: _containers.RepeatedCompositeFieldContainer[Condition]
    env: _containers.ScalarMap[str, str]
    facts: HostFacts
    infra_failures: int
    lease_duration_seconds: int
    lease_renew_time: str
    message: str
    observed_generation: int
    phase: str
    vars: _containers.ScalarMap[str, str]
    def __init__(self, phase: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., vars: _Optional[_Mapping[str, str]] = ..., facts: _Optional[_Union[HostFacts, _Mapping]] = ..., lease_renew_time: _Optional[str] = ..., lease_duration_seconds: _Optional[int] = ..., claim: _Optional[_Union[HostClaim, _Mapping]] = ..., infra_failures: _Optional[int] = ..., conditions: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ..., observed_generation: _Optional[int] = ..., message: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ..., agent_id: _Optional[str] = ...) -> None: ...

class ObjectMeta(_message.Message):
    __slots__ = ["annotations", "creation_timestamp", "deletion_timestamp", "finalizers", "generate_name", "generation", "labels", "name", "owner_references", "resource_version", "uid"]
    class AnnotationsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    CREATION_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    DELETION_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    FINALIZERS_FIELD_NUMBER: _ClassVar[int]
    GENERATE_NAME_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_REFERENCES_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    annotations: _containers.ScalarMap[str, str]
    creation_timestamp: str
    deletion_timestamp: str
    finalizers: _containers.RepeatedScalarFieldContainer[str]
    generate_name: str
    generation: int
    labels: _containers.ScalarMap[str, str]
    name: str
    owner_references: _containers.RepeatedCompositeFieldContainer[OwnerReference]
    resource_version: str
    uid: str
    def __init__(self, name: _Optional[str] = ..., generate_name: _Optional[str] = ..., uid: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., annotations: _Optional[_Mapping[str, str]] = ..., resource_version: _Optional[str] = ..., generation: _Optional[int] = ..., creation_timestamp: _Optional[str] = ..., deletion_timestamp: _Optional[str] = ..., finalizers: _Optional[_Iterable[str]] = ..., owner_references: _Optional[_Iterable[_Union[OwnerReference, _Mapping]]] = ...) -> None: ...

class OwnerReference(_message.Message):
    __slots__ = ["controller", "kind", "name", "uid"]
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    controller: bool
    kind: str
    name: str
    uid: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., uid: _Optional[str] = ..., controller: bool = ...) -> None: ...

class Process(_message.Message):
    __slots__ = ["api_version", "kind", "metadata", "spec", "status"]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    api_version: str
    kind: str
    metadata: ObjectMeta
    spec: ProcessSpec
    status: ProcessStatus
    def __init__(self, api_version: _Optional[str] = ..., kind: _Optional[str] = ..., metadata: _Optional[_Union[ObjectMeta, _Mapping]] = ..., spec: _Optional[_Union[ProcessSpec, _Mapping]] = ..., status: _Optional[_Union[ProcessStatus, _Mapping]] = ...) -> None: ...

class ProcessResult(_message.Message):
    __slots__ = ["exit_code", "finish_time", "host", "message", "name", "phase", "role", "signal", "start_time"]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    FINISH_TIME_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    exit_code: int
    finish_time: str
    host: str
    message: str
    name: str
    phase: str
    role: str
    signal: str
    start_time: str
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., host: _Optional[str] = ..., phase: _Optional[str] = ..., exit_code: _Optional[int] = ..., signal: _Optional[str] = ..., message: _Optional[str] = ..., start_time: _Optional[str] = ..., finish_time: _Optional[str] = ...) -> None: ...

class ProcessSpec(_message.Message):
    __slots__ = ["argv", "env", "exit_codes", "files", "gated", "host_name", "released", "role", "script", "shell", "stdin", "stdin_closed", "stdin_file", "stdin_stream", "step", "stop", "stop_grace", "stop_reason", "test", "test_host_vars", "test_uid", "timeout", "workdir"]
    class EnvEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ARGV_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODES_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    GATED_FIELD_NUMBER: _ClassVar[int]
    HOST_NAME_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SCRIPT_FIELD_NUMBER: _ClassVar[int]
    SHELL_FIELD_NUMBER: _ClassVar[int]
    STDIN_CLOSED_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    STDIN_FILE_FIELD_NUMBER: _ClassVar[int]
    STDIN_STREAM_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_GRACE_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    TEST_HOST_VARS_FIELD_NUMBER: _ClassVar[int]
    TEST_UID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    WORKDIR_FIELD_NUMBER: _ClassVar[int]
    argv: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    exit_codes: _containers.RepeatedScalarFieldContainer[int]
    files: _containers.RepeatedCompositeFieldContainer[FileRef]
    gated: bool
    host_name: str
    released: bool
    role: str
    script: str
    shell: bool
    stdin: str
    stdin_closed: bool
    stdin_file: FileRef
    stdin_stream: bool
    step: str
    stop: bool
    stop_grace: str
    stop_reason: str
    test: str
    test_host_vars: bool
    test_uid: str
    timeout: str
    workdir: str
    def __init__(self, host_name: _Optional[str] = ..., test: _Optional[str] = ..., test_uid: _Optional[str] = ..., role: _Optional[str] = ..., step: _Optional[str] = ..., argv: _Optional[_Iterable[str]] = ..., script: _Optional[str] = ..., shell: bool = ..., env: _Optional[_Mapping[str, str]] = ..., stdin: _Optional[str] = ..., workdir: _Optional[str] = ..., timeout: _Optional[str] = ..., exit_codes: _Optional[_Iterable[int]] = ..., stop: bool = ..., gated: bool = ..., released: bool = ..., files: _Optional[_Iterable[_Union[FileRef, _Mapping]]] = ..., stdin_file: _Optional[_Union[FileRef, _Mapping]] = ..., test_host_vars: bool = ..., stop_reason: _Optional[str] = ..., stop_grace: _Optional[str] = ..., stdin_stream: bool = ..., stdin_closed: bool = ...) -> None: ...

class ProcessStatus(_message.Message):
    __slots__ = ["conditions", "exit_code", "finish_time", "message", "observed_generation", "phase", "pid", "reason", "signal", "start_time", "stderr_bytes", "stderr_truncated", "stdout_bytes", "stdout_truncated"]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    FINISH_TIME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    STDERR_BYTES_FIELD_NUMBER: _ClassVar[int]
    STDERR_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    STDOUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    STDOUT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    conditions: _containers.RepeatedCompositeFieldContainer[Condition]
    exit_code: int
    finish_time: str
    message: str
    observed_generation: int
    phase: str
    pid: int
    reason: str
    signal: str
    start_time: str
    stderr_bytes: int
    stderr_truncated: bool
    stdout_bytes: int
    stdout_truncated: bool
    def __init__(self, phase: _Optional[str] = ..., pid: _Optional[int] = ..., exit_code: _Optional[int] = ..., signal: _Optional[str] = ..., start_time: _Optional[str] = ..., finish_time: _Optional[str] = ..., stdout_bytes: _Optional[int] = ..., stderr_bytes: _Optional[int] = ..., stdout_truncated: bool = ..., stderr_truncated: bool = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., conditions: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ..., observed_generation: _Optional[int] = ...) -> None: ...

class Retry(_message.Message):
    __slots__ = ["infrastructure"]
    INFRASTRUCTURE_FIELD_NUMBER: _ClassVar[int]
    infrastructure: int
    def __init__(self, infrastructure: _Optional[int] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ["after", "allow_failure", "argv", "background", "env", "exit_codes", "files", "name", "on", "retry", "script", "shell", "stdin", "stdin_file", "stdin_stream", "sync", "timeout", "workdir"]
    class EnvEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AFTER_FIELD_NUMBER: _ClassVar[int]
    ALLOW_FAILURE_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODES_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ON_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    SCRIPT_FIELD_NUMBER: _ClassVar[int]
    SHELL_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    STDIN_FILE_FIELD_NUMBER: _ClassVar[int]
    STDIN_STREAM_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    WORKDIR_FIELD_NUMBER: _ClassVar[int]
    after: _containers.RepeatedScalarFieldContainer[str]
    allow_failure: bool
    argv: _containers.RepeatedScalarFieldContainer[str]
    background: bool
    env: _containers.ScalarMap[str, str]
    exit_codes: _containers.RepeatedScalarFieldContainer[int]
    files: _containers.RepeatedCompositeFieldContainer[FileRef]
    name: str
    on: _containers.RepeatedScalarFieldContainer[str]
    retry: Retry
    script: str
    shell: bool
    stdin: str
    stdin_file: FileRef
    stdin_stream: bool
    sync: bool
    timeout: str
    workdir: str
    def __init__(self, name: _Optional[str] = ..., on: _Optional[_Iterable[str]] = ..., after: _Optional[_Iterable[str]] = ..., sync: bool = ..., argv: _Optional[_Iterable[str]] = ..., script: _Optional[str] = ..., shell: bool = ..., env: _Optional[_Mapping[str, str]] = ..., files: _Optional[_Iterable[_Union[FileRef, _Mapping]]] = ..., timeout: _Optional[str] = ..., exit_codes: _Optional[_Iterable[int]] = ..., allow_failure: bool = ..., background: bool = ..., stdin: _Optional[str] = ..., workdir: _Optional[str] = ..., stdin_file: _Optional[_Union[FileRef, _Mapping]] = ..., stdin_stream: bool = ..., retry: _Optional[_Union[Retry, _Mapping]] = ...) -> None: ...

class StepStatus(_message.Message):
    __slots__ = ["completion_time", "message", "name", "phase", "processes", "start_time"]
    COMPLETION_TIME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    completion_time: str
    message: str
    name: str
    phase: str
    processes: _containers.RepeatedCompositeFieldContainer[ProcessResult]
    start_time: str
    def __init__(self, name: _Optional[str] = ..., phase: _Optional[str] = ..., processes: _Optional[_Iterable[_Union[ProcessResult, _Mapping]]] = ..., start_time: _Optional[str] = ..., completion_time: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Test(_message.Message):
    __slots__ = ["api_version", "kind", "metadata", "spec", "status"]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    api_version: str
    kind: str
    metadata: ObjectMeta
    spec: TestSpec
    status: TestStatus
    def __init__(self, api_version: _Optional[str] = ..., kind: _Optional[str] = ..., metadata: _Optional[_Union[ObjectMeta, _Mapping]] = ..., spec: _Optional[_Union[TestSpec, _Mapping]] = ..., status: _Optional[_Union[TestStatus, _Mapping]] = ...) -> None: ...

class TestResult(_message.Message):
    __slots__ = ["message", "outcome", "path", "time"]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    message: str
    outcome: str
    path: str
    time: str
    def __init__(self, path: _Optional[str] = ..., outcome: _Optional[str] = ..., message: _Optional[str] = ..., time: _Optional[str] = ...) -> None: ...

class TestSpec(_message.Message):
    __slots__ = ["env", "files", "hold_on_failure", "hosts", "open", "pending_timeout", "priority", "steps", "tests", "timeout", "ttl_after_finished"]
    class EnvEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENV_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    HOLD_ON_FAILURE_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    PENDING_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TESTS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    TTL_AFTER_FINISHED_FIELD_NUMBER: _ClassVar[int]
    env: _containers.ScalarMap[str, str]
    files: _containers.RepeatedCompositeFieldContainer[FileRef]
    hold_on_failure: bool
    hosts: _containers.RepeatedCompositeFieldContainer[HostRequirement]
    open: bool
    pending_timeout: str
    priority: int
    steps: _containers.RepeatedCompositeFieldContainer[Step]
    tests: _containers.RepeatedCompositeFieldContainer[ChildTest]
    timeout: str
    ttl_after_finished: str
    def __init__(self, timeout: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ..., files: _Optional[_Iterable[_Union[FileRef, _Mapping]]] = ..., hosts: _Optional[_Iterable[_Union[HostRequirement, _Mapping]]] = ..., steps: _Optional[_Iterable[_Union[Step, _Mapping]]] = ..., priority: _Optional[int] = ..., ttl_after_finished: _Optional[str] = ..., hold_on_failure: bool = ..., tests: _Optional[_Iterable[_Union[ChildTest, _Mapping]]] = ..., pending_timeout: _Optional[str] = ..., open: bool = ...) -> None: ...

class TestStatus(_message.Message):
    __slots__ = ["attempts", "claims", "completion_time", "conditions", "env", "host_vars", "message", "observed_generation", "phase", "reason", "results", "start_time", "steps", "trace"]
    class ClaimsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class EnvEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class HostVarsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TIME_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    HOST_VARS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    attempts: _containers.RepeatedCompositeFieldContainer[Attempt]
    claims: _containers.ScalarMap[str, str]
    completion_time: str
    conditions: _containers.RepeatedCompositeFieldContainer[Condition]
    env: _containers.ScalarMap[str, str]
    host_vars: _containers.ScalarMap[str, str]
    message: str
    observed_generation: int
    phase: str
    reason: str
    results: _containers.RepeatedCompositeFieldContainer[TestResult]
    start_time: str
    steps: _containers.RepeatedCompositeFieldContainer[StepStatus]
    trace: TestTrace
    def __init__(self, phase: _Optional[str] = ..., conditions: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ..., observed_generation: _Optional[int] = ..., claims: _Optional[_Mapping[str, str]] = ..., env: _Optional[_Mapping[str, str]] = ..., steps: _Optional[_Iterable[_Union[StepStatus, _Mapping]]] = ..., start_time: _Optional[str] = ..., completion_time: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., trace: _Optional[_Union[TestTrace, _Mapping]] = ..., results: _Optional[_Iterable[_Union[TestResult, _Mapping]]] = ..., host_vars: _Optional[_Mapping[str, str]] = ..., attempts: _Optional[_Iterable[_Union[Attempt, _Mapping]]] = ...) -> None: ...

class TestTrace(_message.Message):
    __slots__ = ["env", "files", "hosts"]
    class EnvEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class FilesEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class HostsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: HostFacts
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[HostFacts, _Mapping]] = ...) -> None: ...
    ENV_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    env: _containers.ScalarMap[str, str]
    files: _containers.ScalarMap[str, str]
    hosts: _containers.MessageMap[str, HostFacts]
    def __init__(self, hosts: _Optional[_Mapping[str, HostFacts]] = ..., env: _Optional[_Mapping[str, str]] = ..., files: _Optional[_Mapping[str, str]] = ...) -> None: ...
