//! `Tests.Rerun`: a new run of an ended test with its original inputs, as
//! `testbus_proto::rerun::rerun_of` decides it; created as any test is.
use super::ResourceService;
use crate::authz::Scope;
use testbus_proto::rerun::{rerun_of, RerunError, RerunOptions};
use testbus_proto::{HostPool, RerunRequest, Test};
use tonic::Status;

impl ResourceService<Test> {
    pub async fn rerun(&self, scope: &Scope, req: RerunRequest) -> Result<Test, Status> {
        let (t, _) = self.load(&req.test).await?;
        let pool = (!req.pool.is_empty()).then(|| req.pool.clone());
        if let Some(p) = &pool {
            ResourceService::<HostPool>::new(self.st.clone()).load(p).await.map_err(|s| match s.code() {
                tonic::Code::NotFound => Status::not_found(format!("pool: HostPool {p:?} does not exist")),
                _ => s,
            })?;
        }
        let opts = RerunOptions { failed_only: req.failed_only, pool };
        let new = rerun_of(&t, &opts).map_err(|e| match e {
            RerunError::NotEnded(_) | RerunError::Open(_) | RerunError::NothingFailed(_) => {
                Status::failed_precondition(e.to_string())
            }
        })?;
        self.create(scope, new).await
    }
}
