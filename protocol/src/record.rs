//! Performance records: one measurement of (workload, method, hardware, model), signed by the
//! peer that measured it. Records are immutable and numbered by their origin: (origin, seq).

use libp2p_identity::{Keypair, PeerId, PublicKey};
use serde::{Deserialize, Serialize};

use crate::codec::{self, MAX_RECORD_BYTES, canonical_bytes};
use crate::error::{ProtocolError, Result};
use crate::hardware::{HardwareId, HardwareProfile};
use crate::id::{ContentId, hex_bytes};
use crate::method::{MethodConfig, MethodId};
use crate::model::{ModelDescriptor, ModelId};
use crate::validate;
use crate::workload::{WorkloadDescriptor, WorkloadId};

/// Content id of a [`PerfRecord`].
pub type RecordId = ContentId;

/// Domain prefix of the bytes a record signature covers.
const SIGNING_DOMAIN: &[u8] = b"metainf/perf-record/v1\0";

/// Latest plausible measurement time: year 2200, in Unix milliseconds.
const MAX_TIMESTAMP_MS: u64 = 7_258_118_400_000;

/// A pair of latency percentiles in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
}

/// What was measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Wall time of the whole run, seconds.
    pub wall_time_s: f64,
    /// Requests completed.
    pub requests: u32,
    /// Prompt tokens processed.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub output_tokens: u64,
    /// Generated tokens per second of wall time.
    pub throughput_tok_s: f64,
    /// Time to first token, milliseconds.
    pub ttft_ms: Percentiles,
    /// Inter-token latency, milliseconds.
    pub itl_ms: Percentiles,
    /// Peak KV-cache memory, bytes.
    pub peak_kv_bytes: u64,
    /// Energy used, joules, when the hardware reports it.
    pub energy_j: Option<f64>,
    /// Cost of the run in the host's price unit, when the host has a price.
    pub cost: Option<f64>,
}

impl Metrics {
    /// Checks that every number is finite and in range.
    pub fn validate(&self) -> Result<()> {
        // A week: longer runs are not single measurements.
        validate::in_range("metrics.wall_time_s", self.wall_time_s, 1e-9, 604_800.0)?;
        validate::finite_nonneg("metrics.throughput_tok_s", self.throughput_tok_s)?;
        for (field, v) in [
            ("metrics.ttft_ms.p50", self.ttft_ms.p50),
            ("metrics.ttft_ms.p95", self.ttft_ms.p95),
            ("metrics.itl_ms.p50", self.itl_ms.p50),
            ("metrics.itl_ms.p95", self.itl_ms.p95),
        ] {
            validate::finite_nonneg(field, v)?;
        }
        if self.ttft_ms.p50 > self.ttft_ms.p95 || self.itl_ms.p50 > self.itl_ms.p95 {
            return Err(ProtocolError::invalid("metrics", "p50 above p95"));
        }
        let implied = self.output_tokens as f64 / self.wall_time_s;
        if (self.throughput_tok_s - implied).abs() > 1e-6 * implied.max(1.0) + 1e-3 {
            return Err(ProtocolError::invalid(
                "metrics.throughput_tok_s",
                format!(
                    "{} does not match output_tokens / wall_time_s = {implied}",
                    self.throughput_tok_s
                ),
            ));
        }
        if let Some(e) = self.energy_j {
            validate::finite_nonneg("metrics.energy_j", e)?;
        }
        if let Some(c) = self.cost {
            validate::finite_nonneg("metrics.cost", c)?;
        }
        Ok(())
    }
}

/// Where a record's measurement came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordSource {
    /// The node's own acceleration benchmark.
    Benchmark,
    /// A finished client job.
    Job,
    /// An external benchmark table imported by the origin, named by its dataset label.
    Imported(String),
    /// A finished client job, served by the host's shared engine alongside other jobs: the
    /// load it met, so that the tensor can tell interference from the method's effect.
    Served(ServedLoad),
}

/// What a served job shared the engine with.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServedLoad {
    /// Mean sequences running per engine step while the job ran, its own included.
    pub mean_running_seqs: f64,
    /// Mean sequences of other jobs running per such step.
    pub mean_foreign_seqs: f64,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_prompt_tokens: u64,
}

impl ServedLoad {
    fn validate(&self) -> Result<()> {
        validate::in_range(
            "record.source.mean_running_seqs",
            self.mean_running_seqs,
            0.0,
            1e6,
        )?;
        validate::in_range(
            "record.source.mean_foreign_seqs",
            self.mean_foreign_seqs,
            0.0,
            1e6,
        )?;
        if self.mean_foreign_seqs > self.mean_running_seqs {
            return Err(ProtocolError::invalid(
                "record.source.mean_foreign_seqs",
                "more foreign sequences than sequences",
            ));
        }
        Ok(())
    }
}

// Validated values are finite, so equality is total.
impl Eq for ServedLoad {}

/// One measurement: the cell P[workload, method, hardware] (for a model) and what was measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PerfRecord {
    /// Peer that measured it and signs it.
    pub origin: PeerId,
    /// The origin's sequence number for this record, from 1, without gaps.
    pub seq: u64,
    /// When it was measured, Unix milliseconds.
    pub measured_at_ms: u64,
    /// Hardware it ran on.
    pub hardware: HardwareProfile,
    /// Model it ran.
    pub model: ModelDescriptor,
    /// Workload it ran.
    pub workload: WorkloadDescriptor,
    /// Method it ran with.
    pub method: MethodConfig,
    /// What was measured.
    pub metrics: Metrics,
    /// Benchmark, job or import.
    pub source: RecordSource,
    /// Version of the engine that measured it.
    pub engine: String,
}

/// The ids of a record's tensor cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CellIds {
    /// Hardware cell.
    pub hardware: HardwareId,
    /// Model.
    pub model: ModelId,
    /// Workload.
    pub workload: WorkloadId,
    /// Method.
    pub method: MethodId,
}

impl PerfRecord {
    /// Checks every field's range and size.
    pub fn validate(&self) -> Result<()> {
        if self.seq == 0 {
            return Err(ProtocolError::invalid(
                "record.seq",
                "sequence numbers start at 1",
            ));
        }
        if self.measured_at_ms > MAX_TIMESTAMP_MS {
            return Err(ProtocolError::invalid(
                "record.measured_at_ms",
                "implausible time",
            ));
        }
        self.hardware.validate()?;
        self.model.validate()?;
        self.workload.validate()?;
        self.method.validate()?;
        self.metrics.validate()?;
        match &self.source {
            RecordSource::Imported(label) => validate::nonempty_text("record.source", label)?,
            RecordSource::Served(load) => {
                load.validate()?;
                if load.cached_prompt_tokens > self.metrics.prompt_tokens {
                    return Err(ProtocolError::invalid(
                        "record.source.cached_prompt_tokens",
                        "more cached prompt tokens than prompt tokens",
                    ));
                }
            }
            RecordSource::Benchmark | RecordSource::Job => {}
        }
        validate::text("record.engine", &self.engine)?;
        Ok(())
    }

    /// The record's content id.
    pub fn id(&self) -> Result<RecordId> {
        ContentId::of("metainf perf-record v1", self)
    }

    /// The ids of its cell.
    pub fn cell(&self) -> Result<CellIds> {
        Ok(CellIds {
            hardware: self.hardware.id()?,
            model: self.model.id()?,
            workload: self.workload.id()?,
            method: self.method.id()?,
        })
    }

    fn signing_bytes(&self) -> Result<Vec<u8>> {
        let body = canonical_bytes(self)?;
        let mut out = Vec::with_capacity(SIGNING_DOMAIN.len() + body.len());
        out.extend_from_slice(SIGNING_DOMAIN);
        out.extend_from_slice(&body);
        Ok(out)
    }
}

/// Longest signer key encoding accepted (an ed25519 key is 36 bytes; RSA keys are not used).
pub const MAX_SIGNER_BYTES: usize = 128;
/// Longest signature accepted (ed25519: 64 bytes; ECDSA and secp256k1 DER: at most 72).
pub const MAX_SIGNATURE_BYTES: usize = 128;

/// A record with its origin's signature: what travels and what is stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SignedRecord {
    /// The measurement.
    pub record: PerfRecord,
    /// Protobuf encoding of the signer's public key.
    #[serde(with = "hex_bytes")]
    pub signer: Vec<u8>,
    /// Signature over the record's canonical encoding.
    #[serde(with = "hex_bytes")]
    pub signature: Vec<u8>,
}

impl SignedRecord {
    /// Signs `record` with `key`, which must be the key of the record's origin.
    pub fn sign(record: PerfRecord, key: &Keypair) -> Result<Self> {
        let public = key.public();
        let signer = public.to_peer_id();
        if signer != record.origin {
            return Err(ProtocolError::SignerNotOrigin {
                signer: Box::new(signer),
                origin: Box::new(record.origin),
            });
        }
        let signature = key
            .sign(&record.signing_bytes()?)
            .map_err(|e| ProtocolError::Signing(e.to_string()))?;
        Ok(Self {
            record,
            signer: public.encode_protobuf(),
            signature,
        })
    }

    /// Verifies the signature, that the signer is the origin, and every value range; and that
    /// the envelope is the one [`SignedRecord::sign`] makes: the signer in its canonical
    /// encoding (protobuf decoding tolerates padding, which the signature does not cover, so a
    /// padded copy would be a second envelope of the same record) and the whole within
    /// [`MAX_RECORD_BYTES`] however it arrived (in a sync batch, not only alone on the wire).
    pub fn verify(self) -> Result<VerifiedRecord> {
        if self.signer.len() > MAX_SIGNER_BYTES || self.signature.len() > MAX_SIGNATURE_BYTES {
            return Err(ProtocolError::InvalidKey(format!(
                "signer of {} bytes or signature of {} bytes (at most {MAX_SIGNER_BYTES} and {MAX_SIGNATURE_BYTES})",
                self.signer.len(),
                self.signature.len()
            )));
        }
        let public = PublicKey::try_decode_protobuf(&self.signer)
            .map_err(|e| ProtocolError::InvalidKey(e.to_string()))?;
        if public.encode_protobuf() != self.signer {
            return Err(ProtocolError::InvalidKey(
                "the signer is not in its canonical encoding".into(),
            ));
        }
        self.to_wire()?;
        let signer = public.to_peer_id();
        if signer != self.record.origin {
            return Err(ProtocolError::SignerNotOrigin {
                signer: Box::new(signer),
                origin: Box::new(self.record.origin),
            });
        }
        if !public.verify(&self.record.signing_bytes()?, &self.signature) {
            return Err(ProtocolError::BadSignature);
        }
        self.record.validate()?;
        let id = self.record.id()?;
        let cell = self.record.cell()?;
        Ok(VerifiedRecord {
            signed: self,
            id,
            cell,
        })
    }

    /// Encodes for the wire, refusing records over [`MAX_RECORD_BYTES`].
    pub fn to_wire(&self) -> Result<Vec<u8>> {
        codec::encode_with_limit(self, MAX_RECORD_BYTES)
    }

    /// Decodes from the wire (size-checked first). The result is not yet verified.
    pub fn from_wire(bytes: &[u8]) -> Result<Self> {
        codec::decode_with_limit(bytes, MAX_RECORD_BYTES)
    }
}

/// A record whose signature, origin and ranges were checked. Only these can be stored.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedRecord {
    signed: SignedRecord,
    id: RecordId,
    cell: CellIds,
}

impl VerifiedRecord {
    /// The signed record.
    pub fn signed(&self) -> &SignedRecord {
        &self.signed
    }

    /// The measurement.
    pub fn record(&self) -> &PerfRecord {
        &self.signed.record
    }

    /// Content id of the record.
    pub fn id(&self) -> RecordId {
        self.id
    }

    /// Ids of its cell.
    pub fn cell(&self) -> CellIds {
        self.cell
    }

    /// The origin peer.
    pub fn origin(&self) -> PeerId {
        self.signed.record.origin
    }

    /// The origin's sequence number.
    pub fn seq(&self) -> u64 {
        self.signed.record.seq
    }

    /// Gives back the signed record.
    pub fn into_signed(self) -> SignedRecord {
        self.signed
    }
}
