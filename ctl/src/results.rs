//! `results`: the report is rendered by testbus-report (the dashboard's
//! downloads render the same); what the client adds is reading the output.
use testbus_proto::Resource;
pub use testbus_report::{render, ReportFormat};

/// The tail of each process's output, for a JUnit report.
pub async fn outputs(
    client: &testbus_client::Client,
    t: &testbus_proto::Test,
) -> crate::error::CliResult<std::collections::HashMap<String, testbus_report::Output>> {
    use futures::StreamExt;
    let mut out = std::collections::HashMap::new();
    for p in t.status().steps.iter().flat_map(|s| &s.processes) {
        let req = testbus_proto::ReadOutputRequest { process: p.name.clone(), follow: false, stdin: false };
        let mut stream = match client.output().read(req).await {
            Ok(s) => s.into_inner(),
            // Deleted with its test's cleanup: the report goes without it.
            Err(s) if s.code() == tonic::Code::NotFound => continue,
            Err(s) => return Err(s.into()),
        };
        let mut tail = testbus_report::OutputTail::default();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            tail.push(chunk.stream, &chunk.data);
        }
        out.insert(p.name.clone(), tail.finish());
    }
    Ok(out)
}
