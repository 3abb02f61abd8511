#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| testbus_proto::fuzzing::subst(data));
