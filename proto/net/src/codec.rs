//! The `/unifleet/blob/1` wire codec for libp2p request-response: one length-prefixed
//! frame per message, its body a `proto` message ([`BlobRequest`] / [`BlobResponse`]).
//! The length is checked against the message kind's limit before anything is read.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use proto::blob::{BlobRequest, BlobResponse};
use proto::codec::Kind;
use std::io;

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/unifleet/blob/1");

#[derive(Debug, Clone, Default)]
pub struct BlobCodec;

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, kind: Kind) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > kind.max_len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{kind} of {len} bytes exceeds the {}-byte limit",
                kind.max_len()
            ),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(bytes).await?;
    io.close().await
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

#[async_trait::async_trait]
impl libp2p::request_response::Codec for BlobCodec {
    type Protocol = StreamProtocol;
    type Request = BlobRequest;
    type Response = BlobResponse;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<BlobRequest> {
        BlobRequest::decode(&read_frame(io, Kind::BlobRequest).await?).map_err(invalid)
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<BlobResponse> {
        BlobResponse::decode(&read_frame(io, Kind::BlobResponse).await?).map_err(invalid)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: BlobRequest,
    ) -> io::Result<()> {
        write_frame(io, &req.encode().map_err(invalid)?).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: BlobResponse,
    ) -> io::Result<()> {
        write_frame(io, &res.encode().map_err(invalid)?).await
    }
}
