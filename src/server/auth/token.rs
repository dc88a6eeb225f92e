//! Finding a request's token: the `Authorization: Bearer` header, a cookie when the manifest
//! names one, or `?access_token=` when the manifest enables it (EventSource cannot set
//! headers). Malformed input is an absent token, never a panic.

use http::HeaderMap;
use http::header::{AUTHORIZATION, COOKIE};

/// Where a token may come from, besides the `Authorization` header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TokenSources {
    /// The cookie that may carry the token.
    pub cookie: Option<String>,
    /// Whether `?access_token=` is accepted.
    pub query: bool,
}

impl TokenSources {
    /// The other places a client could have put its token, for the "missing" error.
    pub(super) fn hint(&self) -> &'static str {
        match (&self.cookie, self.query) {
            (Some(_), true) => ", the token cookie, or ?access_token=",
            (Some(_), false) => " or the token cookie",
            (None, true) => " or ?access_token=",
            (None, false) => "",
        }
    }
}

/// The token of a request: the header wins, then the cookie, then the query's token.
pub(crate) fn find_token<'a>(
    headers: &'a HeaderMap,
    query_token: Option<&'a str>,
    sources: &TokenSources,
) -> Option<&'a str> {
    bearer(headers)
        .or_else(|| {
            sources
                .cookie
                .as_deref()
                .and_then(|name| cookie(headers, name))
        })
        .or_else(|| query_token.filter(|_| sources.query))
        .filter(|token| !token.is_empty())
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim_matches('"'))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use proptest::prelude::*;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).expect("valid header"));
        }
        map
    }

    fn everywhere() -> TokenSources {
        TokenSources {
            cookie: Some("fjord_token".into()),
            query: true,
        }
    }

    #[test]
    fn header_then_cookie_then_query() {
        let sources = everywhere();
        let both = headers(&[
            ("authorization", "Bearer from-header"),
            ("cookie", "fjord_token=from-cookie"),
        ]);
        assert_eq!(
            find_token(&both, Some("from-query"), &sources),
            Some("from-header")
        );
        let cookie_only = headers(&[("cookie", "a=1; fjord_token=from-cookie; b=2")]);
        assert_eq!(
            find_token(&cookie_only, Some("from-query"), &sources),
            Some("from-cookie")
        );
        assert_eq!(
            find_token(&HeaderMap::new(), Some("from-query"), &sources),
            Some("from-query")
        );
    }

    #[test]
    fn only_enabled_sources_count() {
        let sources = TokenSources::default();
        let cookie_only = headers(&[("cookie", "fjord_token=from-cookie")]);
        assert_eq!(find_token(&cookie_only, Some("from-query"), &sources), None);
        let basic = headers(&[("authorization", "Basic dXNlcjpwYXNz")]);
        assert_eq!(find_token(&basic, None, &sources), None);
        let lower = headers(&[("authorization", "bearer  spaced ")]);
        assert_eq!(find_token(&lower, None, &sources), Some("spaced"));
        let empty = headers(&[("authorization", "Bearer ")]);
        assert_eq!(find_token(&empty, None, &sources), None);
    }

    proptest! {
        #[test]
        fn fuzz_token_sources(
            authorization in "\\PC*",
            cookie_header in "\\PC*",
            query in proptest::option::of("\\PC*"),
        ) {
            let mut map = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_str(&authorization) {
                map.insert(AUTHORIZATION, value);
            }
            if let Ok(value) = HeaderValue::from_str(&cookie_header) {
                map.insert(COOKIE, value);
            }
            let found = find_token(&map, query.as_deref(), &everywhere());
            if let Some(token) = found {
                prop_assert!(!token.is_empty());
            }
        }
    }
}
