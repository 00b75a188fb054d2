//! kiln's request-response codec: one length-prefixed CBOR frame per request or
//! response, through `wire::decode`, with a size limit checked before reading the body.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;

use crate::wire::{self, Request, Response, MAX_FRAME_BYTES};

/// Protocol name of kiln's request-response protocol.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/kiln/rr/1");

#[derive(Debug, Clone, Default)]
pub struct KilnCodec;

/// A frame read from a peer: decoded, or rejected with the reason.
///
/// A bad frame is not an I/O error on purpose: libp2p's request-response drops
/// inbound read errors without saying which peer sent them, and kiln must count
/// and ban the sender. The swarm task turns `Invalid` into an offence.
#[derive(Debug)]
pub enum Inbound<T> {
    Valid(T),
    Invalid(wire::WireError),
}

/// Reads one length-prefixed frame; an announced length over the limit is
/// rejected before anything of the body is read.
async fn read_checked<T, M>(io: &mut T) -> io::Result<Inbound<M>>
where
    T: AsyncRead + Unpin + Send,
    M: serde::de::DeserializeOwned,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Ok(Inbound::Invalid(wire::WireError::TooLarge {
            len,
            max: MAX_FRAME_BYTES,
        }));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(match wire::decode(&buf, MAX_FRAME_BYTES) {
        Ok(m) => Inbound::Valid(m),
        Err(e) => Inbound::Invalid(e),
    })
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, bytes: &[u8]) -> io::Result<()> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            wire::WireError::TooLarge {
                len: bytes.len(),
                max: MAX_FRAME_BYTES,
            },
        ));
    }
    io.write_all(&(bytes.len() as u32).to_be_bytes()).await?;
    io.write_all(bytes).await?;
    io.close().await
}

impl libp2p::request_response::Codec for KilnCodec {
    type Protocol = StreamProtocol;
    type Request = Inbound<Request>;
    type Response = Inbound<Response>;

    async fn read_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Inbound<Request>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_checked(io).await
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Inbound<Response>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_checked(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Inbound<Request>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match req {
            Inbound::Valid(req) => write_frame(io, &wire::encode(&req)).await,
            Inbound::Invalid(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an invalid frame is never sent",
            )),
        }
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Inbound<Response>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match res {
            Inbound::Valid(res) => write_frame(io, &wire::encode(&res)).await,
            Inbound::Invalid(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an invalid frame is never sent",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use libp2p::request_response::Codec;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    #[test]
    fn frames_round_trip() {
        let req = Request::MembershipSync {
            cluster: None,
            members: vec![],
        };
        let mut buf = Cursor::new(Vec::new());
        block_on(KilnCodec.write_request(&PROTOCOL, &mut buf, Inbound::Valid(req.clone())))
            .unwrap();
        let mut rd = Cursor::new(buf.into_inner());
        match block_on(KilnCodec.read_request(&PROTOCOL, &mut rd)).unwrap() {
            Inbound::Valid(r) => assert_eq!(r, req),
            Inbound::Invalid(e) => panic!("{e}"),
        }
    }

    #[test]
    fn oversized_frame_is_rejected_before_reading_its_body() {
        let mut bytes = ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(b"short");
        let mut rd = Cursor::new(bytes);
        assert!(matches!(
            block_on(KilnCodec.read_request(&PROTOCOL, &mut rd)).unwrap(),
            Inbound::Invalid(wire::WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_frame_is_invalid_not_an_io_error() {
        let mut bytes = 4u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0xff, 0x00, 0x13, 0x37]);
        let mut rd = Cursor::new(bytes);
        assert!(matches!(
            block_on(KilnCodec.read_response(&PROTOCOL, &mut rd)).unwrap(),
            Inbound::Invalid(_)
        ));
    }
}
