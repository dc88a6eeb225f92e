//! One accepted TCP connection. Its request head is read into a buffer that is freed once
//! parsed. A stream request (`GET /v1/streams…`) is admitted in one call (`request`'s
//! `Admission`) and answered on this task: its refusal, as `ApiError::response` renders it,
//! or the response head, then the connection's events written straight to the socket as
//! HTTP/1.1 chunks, by this task or by the hub in its place (the rules that keep the two in
//! order are in `hub::outlet`) — so that an open stream costs its socket, this task and its
//! queue, and no HTTP library's buffers. Every other request (health, metrics, files, CORS
//! preflight, anything malformed) is handed to hyper with the bytes read so far, one request
//! per connection. `HEAD` of a stream is admitted like its `GET` and answered with the same
//! head, and no stream.

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::compression::Encoding;
use crate::cors::AllowOrigin;
use crate::hub::{DirectWrite, Outgoing, Subscription, WrittenNow};
use crate::limits::Slot;
use crate::metrics::Metrics;
use crate::request::{Admission, Admitted, ApiError, Refused, StreamHead};

/// Longest request head; a longer one is refused with 431.
pub(crate) const MAX_HEAD: usize = 16 * 1024;
/// Most header fields in a request head.
const MAX_HEADERS: usize = 100;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that takes no bytes for this long is gone: its stream is closed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The kernel's send buffer of a stream connection (Linux doubles it for its bookkeeping):
/// a few hundred events, enough for any client that keeps up.
const SEND_BUFFER: usize = 32 * 1024;
/// The first read of a request head; most heads fit.
const FIRST_READ: usize = 2048;

/// Serves a connection that is not a stream request: hyper and warp, given the socket with
/// the bytes read from it so far.
pub(crate) type Fallback =
    Arc<dyn Fn(Prefixed) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Held by every connection until it ends: a draining server waits for all of them.
pub(crate) type OpenConnection = tokio::sync::watch::Receiver<()>;

/// Serves one accepted connection to its end; `slot` is its share of the limits. A stream,
/// once admitted, goes on in a task of its own that holds only what a stream needs: this
/// task, with the request, its head and the admission's state, ends then.
pub(crate) async fn serve(
    mut socket: TcpStream,
    peer: SocketAddr,
    mut slot: Slot,
    admission: Arc<Admission>,
    fallback: Fallback,
    open_connection: OpenConnection,
) {
    let mut buffer = Vec::with_capacity(FIRST_READ);
    let given_up = slot.given_up();
    let head = tokio::select! {
        head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut socket, &mut buffer)) => head,
        // Its descriptor went to a newer connection.
        () = given_up => return,
    };
    slot.head_read();
    let metrics = admission.hub.metrics();
    match head {
        Err(_elapsed) => {}
        Ok(Err(error)) => {
            tracing::debug!(%error, "reading a request head failed");
        }
        Ok(Ok(Head::TooLarge)) => {
            let refusal = ApiError::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "header_too_large",
                format!("the request head is larger than {MAX_HEAD} bytes"),
            );
            let _ = write_refusal(&socket, metrics, &refusal, None, false).await;
        }
        Ok(Ok(Head::BadTarget)) => {
            let refusal = ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request_target",
                "the request target must be a path (/v1/streams/…) or an absolute http(s) URL",
            );
            let _ = write_refusal(&socket, metrics, &refusal, None, false).await;
        }
        Ok(Ok(Head::Other)) => fallback(Prefixed::new(buffer, socket)).await,
        Ok(Ok(Head::Stream(request))) => {
            drop(buffer);
            let chunked = request.chunked;
            match Box::pin(open(&socket, peer.ip(), &mut slot, request, &admission)).await {
                Ok(Some(subscription)) => match stream_options(&socket) {
                    Ok(()) => {
                        let mut streaming = Streaming {
                            socket: Arc::new(socket),
                            subscription,
                            chunked,
                            _slot: slot,
                            _open_connection: open_connection,
                        };
                        // An async block that uses the stream in place: an `async fn` taking
                        // it by value would keep it twice.
                        tokio::spawn(async move {
                            if let Err(error) = streaming.stream().await {
                                tracing::debug!(%error, "stream connection ended with an error");
                            }
                        });
                    }
                    Err(error) => tracing::debug!(%error, "setting up a stream connection failed"),
                },
                Ok(None) => {
                    let _ = shut_down(&socket);
                }
                Err(error) => tracing::debug!(%error, "answering a stream request failed"),
            }
        }
    }
}

/// Answers a connection refused before its request was read, as far as the socket takes
/// the answer at once; the caller closes it.
pub(crate) fn refuse(socket: &TcpStream, metrics: &Metrics, refusal: &ApiError) {
    metrics.requests_refused.fetch_add(1, Relaxed);
    let _ = socket.try_write(&refusal_bytes(refusal, None, false));
}

/// A parsed request head that asks for a stream.
#[derive(Debug)]
struct Stream {
    /// What it asks for.
    head: StreamHead,
    /// HTTP/1.0 has no chunked encoding: the body ends when the connection closes.
    chunked: bool,
    /// `HEAD`: the response head only.
    head_only: bool,
}

#[derive(Debug)]
enum Head {
    Stream(Stream),
    /// Any other request, or one this module does not understand: hyper answers it.
    Other,
    TooLarge,
    /// A target in authority form (`CONNECT host:port`, `GET a:1`) or asterisk form
    /// (`OPTIONS *`): no route serves one, and warp's routing panics on a URI without a
    /// path, so it is refused here and never reaches hyper or warp.
    BadTarget,
}

/// Reads until the request head is complete, then sorts it.
async fn read_head(socket: &mut TcpStream, buffer: &mut Vec<u8>) -> io::Result<Head> {
    let mut searched: usize = 0;
    loop {
        if buffer.len() == buffer.capacity() {
            if buffer.len() >= MAX_HEAD {
                return Ok(Head::TooLarge);
            }
            buffer.reserve(buffer.len().min(MAX_HEAD - buffer.len()));
        }
        if socket.read_buf(buffer).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // Parsed only once the blank line that ends a head has arrived: parsing from the
        // start after every read would take quadratic time for a head sent byte by byte.
        let new_bytes = &buffer[searched.saturating_sub(2)..];
        searched = buffer.len();
        if !contains_blank_line(new_bytes) {
            continue;
        }
        if let Some(head) = parse_head(buffer) {
            return Ok(head);
        }
    }
}

fn contains_blank_line(bytes: &[u8]) -> bool {
    bytes.windows(2).any(|pair| pair == b"\n\n") || bytes.windows(3).any(|three| three == b"\n\r\n")
}

/// The head in `buffer` once it is complete; `None` while more bytes are needed.
fn parse_head(buffer: &[u8]) -> Option<Head> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut fields);
    match request.parse(buffer) {
        Ok(httparse::Status::Partial) => None,
        Err(httparse::Error::TooManyHeaders) => Some(Head::TooLarge),
        // hyper answers malformed requests with its own 400.
        Err(_) => Some(Head::Other),
        Ok(httparse::Status::Complete(_)) => {
            if request.method == Some("CONNECT")
                || !request.path.is_some_and(is_origin_or_absolute_form)
            {
                return Some(Head::BadTarget);
            }
            Some(stream_head(&request).map_or(Head::Other, Head::Stream))
        }
    }
}

fn stream_head(request: &httparse::Request<'_, '_>) -> Option<Stream> {
    let head_only = match request.method? {
        "GET" => false,
        "HEAD" => true,
        _ => return None,
    };
    let target = origin_form(request.path?);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let path_endpoint = match path.strip_prefix("/v1/streams") {
        Some("") => None,
        Some(rest) => {
            let name = rest.strip_prefix('/')?;
            if name.is_empty() || name.contains('/') {
                return None;
            }
            Some(name.to_owned())
        }
        None => return None,
    };
    let mut headers = HeaderMap::with_capacity(request.headers.len());
    for field in request.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(field.value).ok()?;
        headers.append(name, value);
    }
    Some(Stream {
        head: StreamHead {
            path_endpoint,
            query: query.to_owned(),
            headers,
        },
        chunked: request.version != Some(0),
        head_only,
    })
}

/// Whether a request target is a path (origin form) or an `http(s)://` URL (absolute form),
/// the only forms a server's routes take (RFC 9112, section 3.2).
fn is_origin_or_absolute_form(target: &str) -> bool {
    target.starts_with('/') || origin_form(target).len() != target.len()
}

/// The path and query of a request target. A proxy sends the absolute form,
/// `http://host/path?query`, which a server must accept too (RFC 9112, section 3.2.2); its
/// authority is ignored here, as the `Host` field is.
fn origin_form(target: &str) -> &str {
    let starts_with = |scheme: &[u8]| {
        target
            .as_bytes()
            .get(..scheme.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(scheme))
    };
    let scheme_length = if starts_with(b"https://") {
        8
    } else if starts_with(b"http://") {
        7
    } else {
        return target;
    };
    let after_authority = &target[scheme_length..];
    match after_authority.find(['/', '?']) {
        Some(start) if after_authority[start..].starts_with('/') => &after_authority[start..],
        // `http://host` and `http://host?query` ask for `/`, which is no stream.
        _ => "/",
    }
}

/// Sets a stream connection's socket up for a long life of small writes.
fn stream_options(socket: &TcpStream) -> io::Result<()> {
    let options = socket2::SockRef::from(socket);
    // The kernel closes a connection whose client took no bytes for this long, instead of a
    // timer per write in every connection.
    options.set_tcp_user_timeout(Some(WRITE_TIMEOUT))?;
    // A fixed send buffer: autotuned, it grows to megabytes for a client that stopped
    // reading, hiding it from the queue bound for minutes and holding kernel memory.
    options.set_send_buffer_size(SEND_BUFFER)
}

/// An admitted stream: what its task holds for as long as it is open, and no more. Every
/// open stream has one, so each byte here counts once per connection.
struct Streaming {
    socket: Arc<TcpStream>,
    subscription: Subscription,
    /// HTTP/1.1's chunked encoding, or HTTP/1.0's body that ends with the connection.
    chunked: bool,
    /// Its share of the limits, given back when the stream ends.
    _slot: Slot,
    _open_connection: OpenConnection,
}

impl Streaming {
    /// Streams until the hub ends the stream or the client goes.
    async fn stream(&mut self) -> io::Result<()> {
        let direct = self
            .chunked
            .then(|| Arc::new(ChunkedSocket::new(Arc::clone(&self.socket))));
        if let Some(direct) = &direct {
            self.subscription
                .write_directly(Arc::clone(direct) as Arc<dyn DirectWrite>);
        }
        pump(
            &self.socket,
            &mut self.subscription,
            self.chunked,
            direct.as_deref(),
        )
        .await?;
        let mut last = Vec::new();
        if let Some(trailer) = self.subscription.finish() {
            append_chunk(&mut last, &trailer, self.chunked);
        }
        if self.chunked {
            last.extend_from_slice(b"0\r\n\r\n");
        }
        write_all_vectored(&self.socket, &[&last]).await?;
        shut_down(&self.socket)
    }
}

fn shut_down(socket: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Write)
}

/// Admits a stream request, and writes the response head with the stream's first bytes; or
/// writes its refusal and returns `None`. Boxed by its caller: verifying a token may fetch
/// keys, a large future that would otherwise stay in every connection's task for as long as
/// its stream is open.
async fn open(
    socket: &TcpStream,
    peer: IpAddr,
    slot: &mut Slot,
    request: Stream,
    admission: &Admission,
) -> io::Result<Option<Subscription>> {
    match admission.admit(&request.head, peer, slot).await {
        Err(Refused {
            error,
            allow_origin,
        }) => {
            let metrics = admission.hub.metrics();
            let head_only = request.head_only;
            write_refusal(socket, metrics, &error, allow_origin.as_ref(), head_only).await?;
            Ok(None)
        }
        Ok(Admitted {
            subscription,
            allow_origin,
        }) if request.head_only => {
            let coding = Coding::of(admission, &subscription);
            let head = stream_response_head(allow_origin.as_ref(), request.chunked, coding);
            write_all_vectored(socket, &[&head]).await?;
            Ok(None)
        }
        Ok(Admitted {
            mut subscription,
            allow_origin,
        }) => {
            let coding = Coding::of(admission, &subscription);
            let mut head = stream_response_head(allow_origin.as_ref(), request.chunked, coding);
            // The prelude is ready at once: it goes out with the head, in one write.
            if let Some(Outgoing::Events(prelude)) = subscription.next().await {
                append_chunk(&mut head, &prelude, request.chunked);
            }
            write_all_vectored(socket, &[&head]).await?;
            Ok(Some(subscription))
        }
    }
}

/// Writes the subscription's bytes to the socket until either ends; `direct` is the writer
/// the hub was given, if any. Polled by hand: a stream's task holds this for as long as the
/// stream is open, and an `async` loop of awaits would keep every await's state.
async fn pump(
    socket: &TcpStream,
    subscription: &mut Subscription,
    chunked: bool,
    direct: Option<&ChunkedSocket>,
) -> io::Result<()> {
    let mut writing: Option<Write> = None;
    std::future::poll_fn(|cx| {
        loop {
            if let Some(write) = &mut writing {
                let parts = parts_of(write.line.as_ref(), &write.data);
                std::task::ready!(poll_write_all(socket, &parts, &mut write.position, cx))?;
                writing = None;
            }
            writing = match std::task::ready!(next_or_gone(socket, subscription, cx))? {
                Some(Outgoing::Events(bytes)) => Some(Write::new(bytes, chunked)),
                Some(Outgoing::Unfinished) => direct
                    .and_then(ChunkedSocket::take_unfinished)
                    .map(|rest| Write::new(rest, false)),
                None => return Poll::Ready(Ok(())),
            };
        }
    })
    .await
}

/// Bytes on their way to the socket: as one chunk, or as they are, and how far they got.
struct Write {
    data: Bytes,
    /// The chunk's size line, when the data goes as a chunk.
    line: Option<SizeLine>,
    /// (part, offset in it) of the first byte not yet written.
    position: (usize, usize),
}

impl Write {
    fn new(data: Bytes, chunked: bool) -> Self {
        let line = chunked.then(|| SizeLine::of(data.len()));
        Self {
            data,
            line,
            position: (0, 0),
        }
    }
}

/// What goes out: the size line, the data and a line break; or the data alone.
fn parts_of<'a>(line: Option<&'a SizeLine>, data: &'a [u8]) -> [&'a [u8]; 3] {
    match line {
        Some(line) => chunk_parts(line, data),
        None => [data, &[], &[]],
    }
}

/// A stream socket the hub may write an event to in the connection task's place, as one
/// chunk. The framed rest of a chunk the socket took in part waits here for the connection's
/// task, which the hub tells to finish it first.
#[derive(Debug)]
struct ChunkedSocket {
    socket: Arc<TcpStream>,
    unfinished: Mutex<Option<Bytes>>,
}

impl ChunkedSocket {
    fn new(socket: Arc<TcpStream>) -> Self {
        Self {
            socket,
            unfinished: Mutex::new(None),
        }
    }

    fn unfinished(&self) -> MutexGuard<'_, Option<Bytes>> {
        // Only whole values are stored, so a poisoned lock is usable.
        self.unfinished
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The framed rest of the last direct write, once.
    fn take_unfinished(&self) -> Option<Bytes> {
        self.unfinished().take()
    }
}

impl DirectWrite for ChunkedSocket {
    fn write_now(&self, sse: &[u8]) -> WrittenNow {
        let line = SizeLine::of(sse.len());
        let parts = chunk_parts(&line, sse);
        match self.socket.try_write_vectored(&parts.map(IoSlice::new)) {
            Ok(written) if written > 0 => match position_after(&parts, 0, 0, written) {
                (part, _) if part == parts.len() => WrittenNow::All,
                (part, offset) => {
                    let rest = unwritten(&parts, part, offset).collect::<Vec<_>>().concat();
                    *self.unfinished() = Some(rest.into());
                    WrittenNow::Partly
                }
            },
            // Would block, or failed: the connection's task writes it, and meets the error.
            Ok(_) | Err(_) => WrittenNow::Nothing,
        }
    }
}

/// The subscription's next bytes, or an error once the client has gone. A stream's client
/// sends nothing more, so a readable socket means it closed: noticed at once, not at the next
/// heartbeat. Read readiness is polled with the task's own waker, which costs nothing per
/// event (`readable()` adds and removes a waiter each time).
fn next_or_gone(
    socket: &TcpStream,
    subscription: &mut Subscription,
    cx: &mut Context<'_>,
) -> Poll<io::Result<Option<Outgoing>>> {
    if let Poll::Ready(bytes) = subscription.poll_next_unpin(cx) {
        return Poll::Ready(Ok(bytes));
    }
    while let Poll::Ready(ready) = socket.poll_read_ready(cx) {
        if let Err(error) = ready {
            return Poll::Ready(Err(error));
        }
        let mut discard = [0_u8; 16];
        match socket.try_read(&mut discard) {
            Ok(0) => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => {}
            // Readiness is cleared: the next poll registers the waker.
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Poll::Ready(Err(error)),
        }
    }
    Poll::Pending
}

/// How a stream's response is coded: whether the server compresses streams at all (its
/// response then varies with `Accept-Encoding`), and the coding chosen for this one.
#[derive(Debug, Clone, Copy)]
struct Coding {
    offered: bool,
    chosen: Option<Encoding>,
}

impl Coding {
    fn of(admission: &Admission, subscription: &Subscription) -> Self {
        Self {
            offered: admission.compression,
            chosen: subscription.encoding(),
        }
    }
}

fn stream_response_head(
    allow_origin: Option<&AllowOrigin>,
    chunked: bool,
    coding: Coding,
) -> Vec<u8> {
    let mut fields = HeaderMap::with_capacity(8);
    for (name, value) in [
        (header::CONTENT_TYPE, "text/event-stream"),
        (header::CACHE_CONTROL, "no-cache, no-transform"),
        (HeaderName::from_static("x-accel-buffering"), "no"),
        // The server closes every stream connection once the stream ends: said, so that a
        // keep-alive proxy does not send another request on it.
        (header::CONNECTION, "close"),
    ] {
        fields.insert(name, HeaderValue::from_static(value));
    }
    if chunked {
        fields.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    if coding.offered {
        fields.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    if let Some(encoding) = coding.chosen {
        fields.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(encoding.name()),
        );
    }
    response_head(StatusCode::OK, fields, allow_origin)
}

/// A complete response for a refused request (without its body for `HEAD`), as
/// [`ApiError::response`] renders it; the connection closes after it.
fn refusal_bytes(
    refusal: &ApiError,
    allow_origin: Option<&AllowOrigin>,
    head_only: bool,
) -> Vec<u8> {
    let (parts, body) = refusal.response().into_parts();
    let mut fields = parts.headers;
    fields.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    fields.insert(header::CONNECTION, HeaderValue::from_static("close"));
    let mut response = response_head(parts.status, fields, allow_origin);
    if !head_only {
        response.extend_from_slice(body.as_bytes());
    }
    response
}

/// Writes a refusal and counts it.
async fn write_refusal(
    socket: &TcpStream,
    metrics: &Metrics,
    refusal: &ApiError,
    allow_origin: Option<&AllowOrigin>,
    head_only: bool,
) -> io::Result<()> {
    metrics.requests_refused.fetch_add(1, Relaxed);
    let response = refusal_bytes(refusal, allow_origin, head_only);
    write_all_vectored(socket, &[&response]).await
}

/// A response head as bytes: the status line, `fields` with an allowed origin's CORS
/// fields, the blank line.
fn response_head(
    status: StatusCode,
    mut fields: HeaderMap,
    allow_origin: Option<&AllowOrigin>,
) -> Vec<u8> {
    if let Some(allow_origin) = allow_origin {
        allow_origin.add_to(&mut fields);
    }
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in &fields {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// The size line of an HTTP/1.1 chunk, written without allocating.
struct SizeLine {
    bytes: [u8; 18],
    len: usize,
}

impl SizeLine {
    fn of(len: usize) -> Self {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let mut bytes = [0_u8; 18];
        let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
        for (position, digit) in bytes[..digits].iter_mut().enumerate() {
            *digit = HEX[(len >> (4 * (digits - 1 - position))) & 0xF];
        }
        bytes[digits..digits + 2].copy_from_slice(b"\r\n");
        Self {
            bytes,
            len: digits + 2,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// An HTTP/1.1 chunk of `data`: its size line, the data, the closing line break.
fn chunk_parts<'a>(line: &'a SizeLine, data: &'a [u8]) -> [&'a [u8]; 3] {
    [line.as_bytes(), data, b"\r\n"]
}

fn append_chunk(out: &mut Vec<u8>, data: &[u8], chunked: bool) {
    if chunked {
        for part in chunk_parts(&SizeLine::of(data.len()), data) {
            out.extend_from_slice(part);
        }
    } else {
        out.extend_from_slice(data);
    }
}

/// Writes every part, waiting for the socket only when it is full. Polled by hand rather
/// than awaiting `writable()`, whose future would sit in every stream's task.
async fn write_all_vectored(socket: &TcpStream, parts: &[&[u8]]) -> io::Result<()> {
    let mut position = (0, 0);
    std::future::poll_fn(|cx| poll_write_all(socket, parts, &mut position, cx)).await
}

/// Writes `parts` from `position`, (part, offset in it) of the first byte not yet written,
/// which it moves on; ready once all went out.
fn poll_write_all(
    socket: &TcpStream,
    parts: &[&[u8]],
    position: &mut (usize, usize),
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    loop {
        // Past empty parts, which no write would take.
        let (part, offset) = position_after(parts, position.0, position.1, 0);
        *position = (part, offset);
        if part >= parts.len() {
            return Poll::Ready(Ok(()));
        }
        let mut slices = [IoSlice::new(&[]); 3];
        let mut count = 0;
        for (slice, bytes) in slices.iter_mut().zip(unwritten(parts, part, offset)) {
            *slice = IoSlice::new(bytes);
            count += 1;
        }
        match socket.try_write_vectored(&slices[..count]) {
            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Ok(written) => *position = position_after(parts, part, offset, written),
            // Not writable now: wait until it is, then try again.
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                if let Err(error) = std::task::ready!(socket.poll_write_ready(cx)) {
                    return Poll::Ready(Err(error));
                }
            }
            Err(error) => return Poll::Ready(Err(error)),
        }
    }
}

/// What is left of `parts` from (`part`, `offset`) on.
fn unwritten<'a>(parts: &[&'a [u8]], part: usize, offset: usize) -> impl Iterator<Item = &'a [u8]> {
    parts
        .iter()
        .enumerate()
        .skip(part)
        .map(move |(index, bytes)| &bytes[if index == part { offset } else { 0 }..])
}

/// Where the first unwritten byte of `parts` is once `written` more bytes went out from
/// (`part`, `offset`); past empty parts, `(parts.len(), 0)` when all went out.
fn position_after(
    parts: &[&[u8]],
    mut part: usize,
    mut offset: usize,
    mut written: usize,
) -> (usize, usize) {
    while part < parts.len() {
        let left = parts[part].len() - offset;
        if written < left {
            return (part, offset + written);
        }
        written -= left;
        part += 1;
        offset = 0;
    }
    (part, offset)
}

/// A socket whose first bytes were already read: they are read again, then the socket.
#[derive(Debug)]
pub(crate) struct Prefixed {
    prefix: Vec<u8>,
    consumed: usize,
    socket: TcpStream,
}

impl Prefixed {
    /// `socket`, with `prefix` read from it already.
    pub(crate) fn new(prefix: Vec<u8>, socket: TcpStream) -> Self {
        Self {
            prefix,
            consumed: 0,
            socket,
        }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.consumed < this.prefix.len() {
            let left = &this.prefix[this.consumed..];
            let n = left.len().min(buf.remaining());
            buf.put_slice(&left[..n]);
            this.consumed += n;
            if this.consumed == this.prefix.len() {
                this.prefix = Vec::new();
                this.consumed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.socket).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    fn head(text: &str) -> Option<Head> {
        parse_head(text.as_bytes())
    }

    #[test]
    fn stream_requests_are_told_apart() {
        let Some(Head::Stream(one)) =
            head("GET /v1/streams/orders?key=a HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 1-0\r\n\r\n")
        else {
            panic!("a stream request");
        };
        assert_eq!(one.head.path_endpoint.as_deref(), Some("orders"));
        assert_eq!(one.head.query, "key=a");
        assert_eq!(one.head.headers["last-event-id"], "1-0");
        assert!(one.chunked);

        let Some(Head::Stream(several)) =
            head("GET /v1/streams?endpoint=a&endpoint=b HTTP/1.0\r\n\r\n")
        else {
            panic!("a stream request");
        };
        assert_eq!(several.head.path_endpoint, None);
        assert!(!several.chunked);

        for other in [
            "GET /healthz HTTP/1.1\r\n\r\n",
            "OPTIONS /v1/streams/orders HTTP/1.1\r\n\r\n",
            "POST /v1/streams/orders HTTP/1.1\r\n\r\n",
            "GET /v1/streams/orders/ HTTP/1.1\r\n\r\n",
            "GET /v1/streamsx HTTP/1.1\r\n\r\n",
            "GARBAGE\r\n\r\n",
        ] {
            assert!(matches!(head(other), Some(Head::Other)), "{other}");
        }
        assert!(head("GET /v1/streams/orders HTTP/1.1\r\nHost:").is_none());
    }

    #[test]
    fn head_of_a_stream_is_a_stream_request_without_a_body() {
        let Some(Head::Stream(request)) = head("HEAD /v1/streams/orders HTTP/1.1\r\n\r\n") else {
            panic!("a stream request");
        };
        assert!(request.head_only);
        let Some(Head::Stream(request)) = head("GET /v1/streams/orders HTTP/1.1\r\n\r\n") else {
            panic!("a stream request");
        };
        assert!(!request.head_only);
    }

    #[test]
    fn absolute_form_targets_name_their_path() {
        let Some(Head::Stream(request)) = head(
            "GET http://fjord.example:8080/v1/streams/orders?key=a HTTP/1.1\r\nHost: fjord.example\r\n\r\n",
        ) else {
            panic!("a stream request");
        };
        assert_eq!(request.head.path_endpoint.as_deref(), Some("orders"));
        assert_eq!(request.head.query, "key=a");
        for (target, path) in [
            ("HTTPS://h/v1/streams?endpoint=a", "/v1/streams?endpoint=a"),
            ("http://h", "/"),
            ("http://h?x=1", "/"),
            ("http://h/", "/"),
            ("/v1/streams/orders", "/v1/streams/orders"),
            ("http:/x", "http:/x"),
            ("httpé://h/x", "httpé://h/x"),
            ("abcdefé/x", "abcdefé/x"),
        ] {
            assert_eq!(origin_form(target), path, "{target}");
        }
    }

    #[test]
    fn a_refusal_at_a_limit_says_when_to_retry_and_head_leaves_the_body_out() {
        let refusal = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            "full",
        );
        let full = String::from_utf8(refusal_bytes(&refusal, None, false)).expect("utf-8");
        assert!(
            full.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{full}"
        );
        assert!(full.contains("\r\nretry-after: 5\r\n"), "{full}");
        assert!(full.ends_with(&refusal.body()), "{full}");
        let head_only = String::from_utf8(refusal_bytes(&refusal, None, true)).expect("utf-8");
        assert!(head_only.ends_with("\r\n\r\n"), "{head_only}");
        assert!(head_only.contains(&format!("content-length: {}", refusal.body().len())));
    }

    #[test]
    fn a_head_ends_at_its_blank_line() {
        assert!(contains_blank_line(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(contains_blank_line(b"GET / HTTP/1.1\nHost: x\n\n"));
        assert!(contains_blank_line(b"\n\r\n"));
        assert!(!contains_blank_line(b"GET / HTTP/1.1\r\nHost: x\r\n"));
    }

    #[tokio::test]
    async fn a_head_sent_byte_by_byte_is_read_whole() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        let (mut server, _) = listener.accept().await.expect("accept");
        let sender = tokio::spawn(async move {
            for byte in b"GET /v1/streams/orders HTTP/1.1\r\nHost: x\r\n\r\n" {
                client.write_all(&[*byte]).await.expect("write");
                tokio::task::yield_now().await;
            }
            client
        });
        let mut buffer = Vec::with_capacity(FIRST_READ);
        let head = read_head(&mut server, &mut buffer).await.expect("a head");
        assert!(
            matches!(&head, Head::Stream(request) if request.head.path_endpoint.as_deref() == Some("orders")),
            "{head:?}"
        );
        drop(sender.await);
    }

    #[tokio::test]
    async fn a_direct_write_the_socket_cannot_take_whole_leaves_its_framed_rest() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let writer = TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        let (mut reader, _) = listener.accept().await.expect("accept");
        socket2::SockRef::from(&writer)
            .set_send_buffer_size(4096)
            .expect("buffer");
        let writer = Arc::new(writer);
        let sse = vec![b'x'; 4 << 20];
        let direct = ChunkedSocket::new(Arc::clone(&writer));
        assert_eq!(
            direct.write_now(&sse),
            WrittenNow::Partly,
            "4 MiB do not fit a 4 KiB send buffer"
        );
        let rest = direct.take_unfinished().expect("kept for the task");
        assert_eq!(direct.take_unfinished(), None, "once");
        drop(direct);
        let finish = tokio::spawn(async move {
            write_all_vectored(&writer, &[&rest])
                .await
                .expect("the rest");
            drop(writer);
        });
        let mut received = Vec::new();
        reader.read_to_end(&mut received).await.expect("read");
        finish.await.expect("writer");
        let mut expected = Vec::new();
        append_chunk(&mut expected, &sse, true);
        assert!(received == expected, "the chunk arrives whole and in order");
    }

    #[test]
    fn too_many_header_fields_are_refused() {
        let fields = "x-filler: 1\r\n".repeat(MAX_HEADERS + 1);
        let text = format!("GET /v1/streams/orders HTTP/1.1\r\n{fields}\r\n");
        assert!(matches!(head(&text), Some(Head::TooLarge)));
    }

    #[test]
    fn chunks_carry_their_size_in_hex() {
        let mut out = Vec::new();
        append_chunk(&mut out, &[b'x'; 26], true);
        assert_eq!(out, format!("1A\r\n{}\r\n", "x".repeat(26)).into_bytes());
        for len in [0, 1, 15, 16, 255, 4096, 65_535, usize::MAX] {
            assert_eq!(
                SizeLine::of(len).as_bytes(),
                format!("{len:X}\r\n").as_bytes()
            );
        }
    }

    /// Request heads close to valid ones: a method, a target of path pieces, an optional
    /// query, a version, a few fields, and either the end of the head or not.
    fn near_valid_head() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let method =
            prop::sample::select(vec!["GET", "HEAD", "POST", "OPTIONS", "CONNECT", "get", ""]);
        // Authority-form (`a:1`) and asterisk-form (`*`) targets once reached warp and panicked.
        let scheme = prop::sample::select(vec![
            "",
            "http://h",
            "HTTPS://h:1",
            "http://",
            "http:/",
            "a:1",
            "h",
            "*",
            "ftp://h",
        ]);
        let piece = prop::sample::select(vec![
            "/v1",
            "/streams",
            "/orders",
            "/",
            "//",
            "?",
            "&",
            "=",
            "%FF",
            "%",
            "é",
            "\0",
            " ",
            "endpoint=orders",
            "key=a",
            "last_event_id=1-0",
        ]);
        let version =
            prop::sample::select(vec!["HTTP/1.1", "HTTP/1.0", "HTTP/2", "", "HTTP/1.1 x"]);
        let field = prop::sample::select(vec![
            "Host: x",
            "Last-Event-ID: 1-0",
            "Origin: http://a",
            "X-Forwarded-For: 1.2.3.4",
            "Bad Field: x",
            ": x",
            "Host:",
            "x-a: \u{80}",
            " folded",
        ]);
        let end = prop::sample::select(vec!["\r\n\r\n", "\n\n", "\r\n", ""]);
        (
            method,
            scheme,
            prop::collection::vec(piece, 0..8),
            version,
            prop::collection::vec(field, 0..6),
            end,
        )
            .prop_map(|(method, scheme, pieces, version, fields, end)| {
                let mut head = format!("{method} {scheme}{} {version}", pieces.concat());
                for field in fields {
                    head.push_str("\r\n");
                    head.push_str(field);
                }
                head.push_str(end);
                head.into_bytes()
            })
    }

    /// What a parsed head must hold, whatever the input: a stream's endpoint is one path
    /// segment, and nothing but a path or an `http(s)://` URL, and no `CONNECT`, goes on to a
    /// router.
    fn check_stream_head(bytes: &[u8]) -> Result<(), proptest::test_runner::TestCaseError> {
        let head = parse_head(bytes);
        if let Some(Head::Stream(request)) = &head
            && let Some(name) = &request.head.path_endpoint
        {
            proptest::prop_assert!(!name.is_empty() && !name.contains('/'));
        }
        if let Some(Head::Stream(_) | Head::Other) = head {
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut request = httparse::Request::new(&mut fields);
            if let Ok(httparse::Status::Complete(_)) = request.parse(bytes) {
                let target = request.path.unwrap_or_default();
                proptest::prop_assert!(request.method != Some("CONNECT"));
                proptest::prop_assert!(
                    target.starts_with('/')
                        || target.to_ascii_lowercase().starts_with("http://")
                        || target.to_ascii_lowercase().starts_with("https://"),
                    "{target}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn targets_in_authority_or_asterisk_form_are_refused_before_any_router() {
        for head in [
            "GET a:1 HTTP/1.1\r\n\r\n",
            "CONNECT host:443 HTTP/1.1\r\nHost: host:443\r\n\r\n",
            "CONNECT /v1/streams/orders HTTP/1.1\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\n\r\n",
            "GET v1/streams/orders HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(head.as_bytes()), Some(Head::BadTarget)),
                "{head}"
            );
        }
        assert!(matches!(
            parse_head(b"GET http://h:1 HTTP/1.1\r\n\r\n"),
            Some(Head::Other)
        ));
    }

    proptest::proptest! {
        #[test]
        fn fuzz_request_head_from_any_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            check_stream_head(&bytes)?;
        }

        #[test]
        fn fuzz_request_head_near_valid(bytes in near_valid_head()) {
            check_stream_head(&bytes)?;
        }

        #[test]
        fn fuzz_request_target_forms(target in "\\PC{0,40}", authority in "[a-zA-Z0-9.:@\\[\\]-]{0,20}") {
            let path = origin_form(&target);
            proptest::prop_assert!(target.ends_with(path) || path == "/");
            for scheme in ["http://", "HTTP://", "https://"] {
                let absolute = format!("{scheme}{authority}/{target}");
                let path = origin_form(&absolute);
                proptest::prop_assert_eq!(path, format!("/{target}"));
            }
        }

        #[test]
        fn fuzz_every_split_of_a_write_is_written_in_order(
            parts in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..50), 1..4),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let address = listener.local_addr().expect("address");
                let writer = TcpStream::connect(address).await.expect("connect");
                let (mut reader, _) = listener.accept().await.expect("accept");
                let slices: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
                write_all_vectored(&writer, &slices).await.expect("written");
                drop(writer);
                let mut received = Vec::new();
                reader.read_to_end(&mut received).await.expect("read");
                proptest::prop_assert_eq!(received, parts.concat());
                Ok(())
            })?;
        }
    }
}
