from testbus.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor
OUTPUT_STREAM_STDERR: OutputStream
OUTPUT_STREAM_STDIN: OutputStream
OUTPUT_STREAM_STDOUT: OutputStream

class AppendOutputResponse(_message.Message):
    __slots__ = ["length", "truncated"]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    length: int
    truncated: bool
    def __init__(self, length: _Optional[int] = ..., truncated: bool = ...) -> None: ...

class BarrierRequest(_message.Message):
    __slots__ = ["name", "process", "roles", "timeout"]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    process: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    timeout: str
    def __init__(self, process: _Optional[str] = ..., name: _Optional[str] = ..., timeout: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ...) -> None: ...

class BarrierResponse(_message.Message):
    __slots__ = ["participants"]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    participants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, participants: _Optional[_Iterable[str]] = ...) -> None: ...

class BlobChunk(_message.Message):
    __slots__ = ["data"]
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class BlobRef(_message.Message):
    __slots__ = ["digest", "size"]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size: int
    def __init__(self, digest: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class ClaimAssignment(_message.Message):
    __slots__ = ["host", "host_resource_version", "role"]
    HOST_FIELD_NUMBER: _ClassVar[int]
    HOST_RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    host: str
    host_resource_version: str
    role: str
    def __init__(self, role: _Optional[str] = ..., host: _Optional[str] = ..., host_resource_version: _Optional[str] = ...) -> None: ...

class ClaimRequest(_message.Message):
    __slots__ = ["assignments", "status", "test", "test_resource_version"]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    TEST_RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    assignments: _containers.RepeatedCompositeFieldContainer[ClaimAssignment]
    status: _resources_pb2.TestStatus
    test: str
    test_resource_version: str
    def __init__(self, test: _Optional[str] = ..., test_resource_version: _Optional[str] = ..., assignments: _Optional[_Iterable[_Union[ClaimAssignment, _Mapping]]] = ..., status: _Optional[_Union[_resources_pb2.TestStatus, _Mapping]] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ["host_name", "pool", "role", "ttl", "uses"]
    HOST_NAME_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    USES_FIELD_NUMBER: _ClassVar[int]
    host_name: str
    pool: str
    role: str
    ttl: str
    uses: int
    def __init__(self, ttl: _Optional[str] = ..., pool: _Optional[str] = ..., host_name: _Optional[str] = ..., role: _Optional[str] = ..., uses: _Optional[int] = ...) -> None: ...

class CreateTokenResponse(_message.Message):
    __slots__ = ["expires", "token"]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    expires: str
    token: str
    def __init__(self, token: _Optional[str] = ..., expires: _Optional[str] = ...) -> None: ...

class Credentials(_message.Message):
    __slots__ = ["certificate", "certificate_authority"]
    CERTIFICATE_AUTHORITY_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    certificate: str
    certificate_authority: str
    def __init__(self, certificate: _Optional[str] = ..., certificate_authority: _Optional[str] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ["name", "resource_version"]
    NAME_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    resource_version: str
    def __init__(self, name: _Optional[str] = ..., resource_version: _Optional[str] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ["digest"]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class ExecRequest(_message.Message):
    __slots__ = ["command", "on", "test"]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ON_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    command: _resources_pb2.Step
    on: _containers.RepeatedScalarFieldContainer[str]
    test: str
    def __init__(self, test: _Optional[str] = ..., on: _Optional[_Iterable[str]] = ..., command: _Optional[_Union[_resources_pb2.Step, _Mapping]] = ...) -> None: ...

class ExecResponse(_message.Message):
    __slots__ = ["processes"]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    processes: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Process]
    def __init__(self, processes: _Optional[_Iterable[_Union[_resources_pb2.Process, _Mapping]]] = ...) -> None: ...

class FinishRequest(_message.Message):
    __slots__ = ["cancel", "failed", "message", "test"]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    cancel: bool
    failed: bool
    message: str
    test: str
    def __init__(self, test: _Optional[str] = ..., failed: bool = ..., message: _Optional[str] = ..., cancel: bool = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ["name"]
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class HostEvent(_message.Message):
    __slots__ = ["object", "resource_version", "type"]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    object: _resources_pb2.Host
    resource_version: str
    type: str
    def __init__(self, type: _Optional[str] = ..., object: _Optional[_Union[_resources_pb2.Host, _Mapping]] = ..., resource_version: _Optional[str] = ...) -> None: ...

class HostList(_message.Message):
    __slots__ = ["items", "resource_version"]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Host]
    resource_version: str
    def __init__(self, items: _Optional[_Iterable[_Union[_resources_pb2.Host, _Mapping]]] = ..., resource_version: _Optional[str] = ...) -> None: ...

class HostPoolEvent(_message.Message):
    __slots__ = ["object", "resource_version", "type"]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    object: _resources_pb2.HostPool
    resource_version: str
    type: str
    def __init__(self, type: _Optional[str] = ..., object: _Optional[_Union[_resources_pb2.HostPool, _Mapping]] = ..., resource_version: _Optional[str] = ...) -> None: ...

class HostPoolList(_message.Message):
    __slots__ = ["items", "resource_version"]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_resources_pb2.HostPool]
    resource_version: str
    def __init__(self, items: _Optional[_Iterable[_Union[_resources_pb2.HostPool, _Mapping]]] = ..., resource_version: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ["csr", "host_name", "take_over", "token"]
    CSR_FIELD_NUMBER: _ClassVar[int]
    HOST_NAME_FIELD_NUMBER: _ClassVar[int]
    TAKE_OVER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    csr: str
    host_name: str
    take_over: bool
    token: str
    def __init__(self, token: _Optional[str] = ..., host_name: _Optional[str] = ..., csr: _Optional[str] = ..., take_over: bool = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ["field_selector", "label_selector"]
    FIELD_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    LABEL_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    field_selector: str
    label_selector: str
    def __init__(self, label_selector: _Optional[str] = ..., field_selector: _Optional[str] = ...) -> None: ...

class OutputChunk(_message.Message):
    __slots__ = ["data", "lost", "notice", "offset", "process", "process_uid", "stream", "time_unix_ms"]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    PROCESS_UID_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    lost: int
    notice: bool
    offset: int
    process: str
    process_uid: str
    stream: OutputStream
    time_unix_ms: int
    def __init__(self, process: _Optional[str] = ..., stream: _Optional[_Union[OutputStream, str]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., notice: bool = ..., time_unix_ms: _Optional[int] = ..., lost: _Optional[int] = ..., process_uid: _Optional[str] = ...) -> None: ...

class ProcessEvent(_message.Message):
    __slots__ = ["object", "resource_version", "type"]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    object: _resources_pb2.Process
    resource_version: str
    type: str
    def __init__(self, type: _Optional[str] = ..., object: _Optional[_Union[_resources_pb2.Process, _Mapping]] = ..., resource_version: _Optional[str] = ...) -> None: ...

class ProcessList(_message.Message):
    __slots__ = ["items", "resource_version"]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Process]
    resource_version: str
    def __init__(self, items: _Optional[_Iterable[_Union[_resources_pb2.Process, _Mapping]]] = ..., resource_version: _Optional[str] = ...) -> None: ...

class ReadOutputRequest(_message.Message):
    __slots__ = ["follow", "process", "stdin"]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    follow: bool
    process: str
    stdin: bool
    def __init__(self, process: _Optional[str] = ..., follow: bool = ..., stdin: bool = ...) -> None: ...

class RecordResultRequest(_message.Message):
    __slots__ = ["message", "outcome", "path", "test"]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    message: str
    outcome: str
    path: str
    test: str
    def __init__(self, test: _Optional[str] = ..., path: _Optional[str] = ..., outcome: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class RecvRequest(_message.Message):
    __slots__ = ["key", "process", "timeout"]
    FROM_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    key: str
    process: str
    timeout: str
    def __init__(self, process: _Optional[str] = ..., key: _Optional[str] = ..., timeout: _Optional[str] = ..., **kwargs) -> None: ...

class RecvResponse(_message.Message):
    __slots__ = ["messages"]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[SyncMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[SyncMessage, _Mapping]]] = ...) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ["agent_id", "name", "release"]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    name: str
    release: bool
    def __init__(self, name: _Optional[str] = ..., agent_id: _Optional[str] = ..., release: bool = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ["csr"]
    CSR_FIELD_NUMBER: _ClassVar[int]
    csr: str
    def __init__(self, csr: _Optional[str] = ...) -> None: ...

class RerunRequest(_message.Message):
    __slots__ = ["failed_only", "pool", "test"]
    FAILED_ONLY_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    failed_only: bool
    pool: str
    test: str
    def __init__(self, test: _Optional[str] = ..., failed_only: bool = ..., pool: _Optional[str] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ["host_name", "user_name"]
    HOST_NAME_FIELD_NUMBER: _ClassVar[int]
    USER_NAME_FIELD_NUMBER: _ClassVar[int]
    host_name: str
    user_name: str
    def __init__(self, host_name: _Optional[str] = ..., user_name: _Optional[str] = ...) -> None: ...

class RevokeResponse(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ["token"]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class RevokeTokenResponse(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class SendRequest(_message.Message):
    __slots__ = ["key", "process", "value"]
    KEY_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    process: str
    value: bytes
    def __init__(self, process: _Optional[str] = ..., key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...

class SendResponse(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class SetEnvRequest(_message.Message):
    __slots__ = ["env", "test"]
    class EnvEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENV_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    env: _containers.ScalarMap[str, str]
    test: str
    def __init__(self, test: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ["action", "host", "name"]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    action: str
    host: str
    name: str
    def __init__(self, host: _Optional[str] = ..., action: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class SnapshotResponse(_message.Message):
    __slots__ = ["snapshots"]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, snapshots: _Optional[_Iterable[str]] = ...) -> None: ...

class StatBlobRequest(_message.Message):
    __slots__ = ["digest"]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class StatBlobResponse(_message.Message):
    __slots__ = ["exists", "size"]
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    exists: bool
    size: int
    def __init__(self, exists: bool = ..., size: _Optional[int] = ...) -> None: ...

class SyncMessage(_message.Message):
    __slots__ = ["sender", "value"]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    sender: str
    value: bytes
    def __init__(self, sender: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...

class TestEvent(_message.Message):
    __slots__ = ["object", "resource_version", "type"]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    object: _resources_pb2.Test
    resource_version: str
    type: str
    def __init__(self, type: _Optional[str] = ..., object: _Optional[_Union[_resources_pb2.Test, _Mapping]] = ..., resource_version: _Optional[str] = ...) -> None: ...

class TestList(_message.Message):
    __slots__ = ["items", "resource_version"]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Test]
    resource_version: str
    def __init__(self, items: _Optional[_Iterable[_Union[_resources_pb2.Test, _Mapping]]] = ..., resource_version: _Optional[str] = ...) -> None: ...

class UploadRequest(_message.Message):
    __slots__ = ["data", "digest"]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    digest: str
    def __init__(self, digest: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ["field_selector", "label_selector", "resource_version"]
    FIELD_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    LABEL_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    field_selector: str
    label_selector: str
    resource_version: str
    def __init__(self, resource_version: _Optional[str] = ..., label_selector: _Optional[str] = ..., field_selector: _Optional[str] = ...) -> None: ...

class OutputStream(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []
