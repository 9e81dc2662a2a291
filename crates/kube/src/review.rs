//! The CA's check of a projected service-account token, as istiod's: Kubernetes'
//! `TokenReview` API, asked for the audiences a sidecar's token carries (`istio-ca`, Istio's;
//! `hypha-ca`, Hypha's own). The caller is the namespace and service account the review names,
//! and only a token bound to a pod is taken: the API server then refuses it once that pod is
//! gone, so a deleted pod's token gets no certificate.

use hypha_ca::service::AuthError;
use hypha_ca::Caller;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use kube::Client;

/// The audiences asked for.
pub const AUDIENCES: &[&str] = &["istio-ca", "hypha-ca"];

/// The extra field naming the pod a token is bound to.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";

pub struct TokenReviewer {
    client: Client,
}

impl TokenReviewer {
    pub fn new(client: Client) -> TokenReviewer {
        TokenReviewer { client }
    }
}

#[tonic::async_trait]
impl hypha_ca::TokenReview for TokenReviewer {
    async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(AUDIENCES.iter().map(|a| (*a).to_owned()).collect()),
            },
            ..Default::default()
        };
        let done = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::ReviewUnavailable(e.to_string()))?;
        let status = done
            .status
            .ok_or_else(|| AuthError::ReviewUnavailable("the review has no status".into()))?;
        if status.authenticated != Some(true) {
            return Err(AuthError::Review(
                status.error.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        if let Some(audiences) = &status.audiences {
            if !audiences.iter().any(|a| AUDIENCES.contains(&a.as_str())) {
                return Err(AuthError::Review("the token is not for the CA".into()));
            }
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((ns, sa)) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty())
        else {
            return Err(AuthError::Review(format!(
                "{username:?} is not a service account"
            )));
        };
        let bound = user
            .extra
            .as_ref()
            .and_then(|e| e.get(POD_NAME))
            .is_some_and(|pods| !pods.is_empty());
        if !bound {
            return Err(AuthError::Review(
                "the token is bound to no pod: a projected service-account token is needed".into(),
            ));
        }
        Ok(Caller::new(ns, sa))
    }
}
