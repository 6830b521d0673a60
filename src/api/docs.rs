//! `GET /docs`: Swagger UI on this server's `/openapi.json`. The UI's files are vendored from npm's
//! `swagger-ui-dist` (scripts/vendor_swagger_ui.sh, pinned version in assets/swagger-ui/VERSION) and
//! embedded in the binary, so the page works without any network beyond this server: its Content
//! Security Policy lets it load and call nothing else.
//!
//! Public, like `/openapi.json`: the page and its files carry no data. The operations it calls keep
//! their own access rules (the bearer token of API_TOKEN, entered with "Authorize").

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &[u8] = include_bytes!("../../assets/docs/index.html");
const INIT_JS: &[u8] = include_bytes!("../../assets/docs/init.js");
const BUNDLE_JS: &[u8] = include_bytes!("../../assets/swagger-ui/swagger-ui-bundle.js");
const CSS: &[u8] = include_bytes!("../../assets/swagger-ui/swagger-ui.css");
const LICENSE: &[u8] = include_bytes!("../../assets/swagger-ui/LICENSE");
/// The vendored Swagger UI version (part of the assets' cache validator).
pub const SWAGGER_UI_VERSION: &str = include_str!("../../assets/swagger-ui/VERSION");

/// Only this server: scripts and styles from /docs/, requests to this origin, images inline.
/// Swagger UI sets inline styles, hence 'unsafe-inline' for styles (not for scripts).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
                   connect-src 'self'; font-src 'self' data:; base-uri 'self'; form-action 'self'; \
                   frame-ancestors 'none'";

/// The /docs routes (stateless; merged into the API and ops routers).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/docs", get(|| async { page(INDEX_HTML, "text/html; charset=utf-8", false) }))
        .route("/docs/init.js", get(|| async { page(INIT_JS, "text/javascript; charset=utf-8", true) }))
        .route("/docs/swagger-ui-bundle.js", get(|| async { page(BUNDLE_JS, "text/javascript; charset=utf-8", true) }))
        .route("/docs/swagger-ui.css", get(|| async { page(CSS, "text/css; charset=utf-8", true) }))
        .route("/docs/LICENSE", get(|| async { page(LICENSE, "text/plain; charset=utf-8", true) }))
}

/// One embedded file. The page itself is revalidated on every load (it names the assets); the
/// assets may be cached for a day (they change only with the binary).
fn page(body: &'static [u8], content_type: &'static str, asset: bool) -> Response {
    let cache = if asset { "public, max-age=86400" } else { "no-cache" };
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
            (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_vendored_files() {
        let html = std::str::from_utf8(INDEX_HTML).unwrap();
        for src in ["docs/swagger-ui-bundle.js", "docs/swagger-ui.css", "docs/init.js"] {
            assert!(html.contains(src), "{src}");
        }
        assert!(!html.contains("http://") && !html.contains("https://"), "no external URL in the page");
        let init = std::str::from_utf8(INIT_JS).unwrap();
        assert!(init.contains("\"openapi.json\"") && init.contains("validatorUrl: null"));
        assert!(SWAGGER_UI_VERSION.trim().starts_with('5'));
        assert!(BUNDLE_JS.len() > 100_000 && CSS.len() > 10_000);
    }
}
