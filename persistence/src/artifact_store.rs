//! Artifact content on disk, addressed by its SHA-256: `artifacts/blobs/<sha>` holds
//! complete, verified content and `<sha>.chunks` the SHA-256 of each chunk;
//! `artifacts/partial/<sha>` is a fetch under way (resumed after a restart from its
//! verified prefix); `artifacts/uploads/` holds uploads being received. Content
//! becomes visible under `blobs/` only by an atomic rename after it was verified
//! and fsynced, so nothing half-written is ever served. `artifacts/announced`
//! lists the versions this node has announced holding (so an announcement cut
//! off by a crash or a timeout is made later, and a made one is not repeated).
//!
//! Every function does blocking file I/O: call it off the async threads.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

use crate::error::StoreError;

/// Size of the pieces an artifact is fetched in (the last may be shorter).
pub const ARTIFACT_CHUNK: u64 = 1024 * 1024;

/// The digests of a stored artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    /// Hex SHA-256 of the content.
    pub sha256: String,
    pub size: u64,
    /// SHA-256 of each chunk.
    pub chunks: Vec<[u8; 32]>,
}

impl Digests {
    /// Hex SHA-256 over the chunk digests, which the control plane records.
    pub fn chunks_root(&self) -> String {
        chunks_root(&self.chunks)
    }
}

pub fn chunks_root(chunks: &[[u8; 32]]) -> String {
    let mut h = Sha256::new();
    for c in chunks {
        h.update(c);
    }
    hex::encode(h.finalize())
}

/// Number of chunks of an artifact of `size` bytes.
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(ARTIFACT_CHUNK)
}

/// Whether `s` is a hex SHA-256 (what may become a file name here).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

pub struct ArtifactStore {
    dir: PathBuf,
    /// Complete content garbage collection spares for its grace period whatever
    /// the live versions say (see `Claim`). Held by garbage collection while it
    /// looks at and removes a file, so it never removes content just claimed.
    claims: Mutex<HashMap<String, Claim>>,
    /// Numbers upload claims (from 1).
    next_claim: AtomicU64,
    /// Held for a whole collection: one that started with an older `keep`
    /// finishes before a newer one releases claims.
    collecting: Mutex<()>,
    /// The newest list of announced versions written (an older one that
    /// finishes later is not written over it).
    announced_written: Mutex<u64>,
}

/// Why complete content is spared by garbage collection (for its grace period
/// at most), and since when.
#[derive(Debug, Clone, Copy)]
struct Claim {
    kind: ClaimKind,
    at: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClaimKind {
    /// On disk at start: spared until the live versions list it (from then on
    /// they decide). After a restart the applied control-plane state may not
    /// yet have what was published before it.
    FoundAtStart,
    /// Fetched: spared from collections whose `keep` was taken before it
    /// completed (the fetch may have started after).
    Fetched,
    /// Uploaded (the number `keep_upload` gave): spared until this node's
    /// applied state has its publish (`collect_garbage`'s `published`),
    /// whatever the live versions say meanwhile — an older version of the same
    /// content may be retired just before.
    Upload(u64),
}

/// Versions (name, version) this node has announced holding.
pub type Announced = BTreeSet<(String, u64)>;

fn io_err(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Storage {
        path: path.to_path_buf(),
        source: redb::StorageError::Io(e).into(),
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

/// An upload being received: written to a temporary file and hashed as it comes.
pub struct Upload {
    file: File,
    path: PathBuf,
    whole: Sha256,
    chunk: Sha256,
    in_chunk: u64,
    chunks: Vec<[u8; 32]>,
    size: u64,
}

impl Upload {
    pub fn write(&mut self, mut data: &[u8]) -> Result<(), StoreError> {
        self.file
            .write_all(data)
            .map_err(|e| io_err(&self.path, e))?;
        self.whole.update(data);
        self.size += data.len() as u64;
        while !data.is_empty() {
            let take = ((ARTIFACT_CHUNK - self.in_chunk) as usize).min(data.len());
            self.chunk.update(&data[..take]);
            self.in_chunk += take as u64;
            data = &data[take..];
            if self.in_chunk == ARTIFACT_CHUNK {
                self.chunks
                    .push(std::mem::take(&mut self.chunk).finalize().into());
                self.in_chunk = 0;
            }
        }
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The upload's digests, before it is kept.
    pub fn digests(&mut self) -> Digests {
        if self.in_chunk > 0 {
            self.chunks
                .push(std::mem::take(&mut self.chunk).finalize().into());
            self.in_chunk = 0;
        }
        Digests {
            sha256: hex::encode(self.whole.clone().finalize()),
            size: self.size,
            chunks: self.chunks.clone(),
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // Kept uploads were renamed away; anything else is discarded.
        let _ = fs::remove_file(&self.path);
    }
}

impl ArtifactStore {
    /// Opens `artifacts/` in the data directory; uploads cut short by a stop are
    /// discarded.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let dir = data_dir.join("artifacts");
        let fresh = !dir.exists();
        for sub in ["blobs", "partial", "uploads"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(|e| StoreError::CreateDir {
                path: p.clone(),
                source: e,
            })?;
        }
        let uploads = dir.join("uploads");
        for entry in fs::read_dir(&uploads)
            .map_err(|e| io_err(&uploads, e))?
            .flatten()
        {
            let _ = fs::remove_file(entry.path());
        }
        let mut found = HashMap::new();
        let blobs = dir.join("blobs");
        let now = Instant::now();
        for entry in fs::read_dir(&blobs)
            .map_err(|e| io_err(&blobs, e))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().to_string();
            if is_sha256_hex(&name) {
                found.insert(
                    name,
                    Claim {
                        kind: ClaimKind::FoundAtStart,
                        at: now,
                    },
                );
            }
        }
        let store = ArtifactStore {
            dir,
            claims: Mutex::new(found),
            next_claim: AtomicU64::new(1),
            collecting: Mutex::new(()),
            announced_written: Mutex::new(0),
        };
        if fresh {
            // A directory from before the list has none (see `announced`).
            store.set_announced(1, &Announced::new())?;
        }
        Ok(store)
    }

    fn announced_path(&self) -> PathBuf {
        self.dir.join("announced")
    }

    /// The versions this node announced holding, or `None` for a directory
    /// kept by a kiln from before the list (which announced everything it held).
    pub fn announced(&self) -> Result<Option<Announced>, StoreError> {
        let path = self.announced_path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path, e)),
        };
        let corrupt = |line: &str| StoreError::Corrupt {
            path: path.clone(),
            what: "announced artifact versions".into(),
            detail: format!("line {line:?} is not '<version> <hex name>'"),
        };
        let mut out = Announced::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let (version, name) = line.split_once(' ').ok_or_else(|| corrupt(line))?;
            let version = version.parse().map_err(|_| corrupt(line))?;
            let name = hex::decode(name)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| corrupt(line))?;
            out.insert((name, version));
        }
        Ok(Some(out))
    }

    /// Replaces the list of announced versions (fsynced), unless a list of a
    /// later `generation` was written already.
    pub fn set_announced(&self, generation: u64, set: &Announced) -> Result<(), StoreError> {
        let mut written = lock(&self.announced_written);
        if generation < *written {
            return Ok(());
        }
        let path = self.announced_path();
        let tmp = path.with_extension("tmp");
        let mut text = String::new();
        for (name, version) in set {
            text.push_str(&format!("{version} {}\n", hex::encode(name)));
        }
        let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        f.write_all(text.as_bytes()).map_err(|e| io_err(&tmp, e))?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
        sync_dir(&self.dir)?;
        *written = generation;
        Ok(())
    }

    pub fn blob_path(&self, sha: &str) -> PathBuf {
        self.dir.join("blobs").join(sha)
    }

    fn manifest_path(&self, sha: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{sha}.chunks"))
    }

    fn partial_path(&self, sha: &str) -> PathBuf {
        self.dir.join("partial").join(sha)
    }

    /// Whether complete, verified content with this digest is here.
    pub fn has(&self, sha: &str) -> bool {
        is_sha256_hex(sha) && self.blob_path(sha).is_file() && self.manifest_path(sha).is_file()
    }

    /// Starts receiving an upload.
    pub fn upload(&self) -> Result<Upload, StoreError> {
        let path = self
            .dir
            .join("uploads")
            .join(format!("{:016x}", rand::random::<u64>()));
        let file = File::create(&path).map_err(|e| io_err(&path, e))?;
        Ok(Upload {
            file,
            path,
            whole: Sha256::new(),
            chunk: Sha256::new(),
            in_chunk: 0,
            chunks: Vec::new(),
            size: 0,
        })
    }

    /// Keeps a received upload under its digest (fsynced); returns its digests
    /// and the claim that spares it until its publish is applied here.
    pub fn keep_upload(&self, mut upload: Upload) -> Result<(Digests, u64), StoreError> {
        let digests = upload.digests();
        upload
            .file
            .sync_all()
            .map_err(|e| io_err(&upload.path, e))?;
        let dest = self.blob_path(&digests.sha256);
        let mut claims = lock(&self.claims);
        // Same content already here (perhaps retired, awaiting collection)
        // counts as new too: this upload's claim replaces any earlier one.
        let id = self.next_claim.fetch_add(1, Ordering::Relaxed);
        claims.insert(
            digests.sha256.clone(),
            Claim {
                kind: ClaimKind::Upload(id),
                at: Instant::now(),
            },
        );
        if !self.has(&digests.sha256) {
            self.write_manifest(&digests.sha256, &digests.chunks)?;
            fs::rename(&upload.path, &dest).map_err(|e| io_err(&dest, e))?;
            sync_dir(&self.dir.join("blobs"))?;
        }
        Ok((digests, id))
    }

    fn write_manifest(&self, sha: &str, chunks: &[[u8; 32]]) -> Result<(), StoreError> {
        let path = self.manifest_path(sha);
        // A name of its own: a fetch completing and an upload of the same
        // content may write this manifest at once.
        let tmp = path.with_extension(format!("chunks.{:016x}.tmp", rand::random::<u64>()));
        let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        for c in chunks {
            f.write_all(c).map_err(|e| io_err(&tmp, e))?;
        }
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))
    }

    /// The chunk digests of complete content held here.
    pub fn manifest(&self, sha: &str) -> Result<Vec<[u8; 32]>, StoreError> {
        let path = self.manifest_path(sha);
        let bytes = fs::read(&path).map_err(|e| io_err(&path, e))?;
        if bytes.len() % 32 != 0 {
            return Err(StoreError::Corrupt {
                path,
                what: "chunk digests".into(),
                detail: format!("{} bytes is not a multiple of 32", bytes.len()),
            });
        }
        Ok(bytes
            .chunks_exact(32)
            .map(|c| {
                let mut a = [0u8; 32];
                a.copy_from_slice(c);
                a
            })
            .collect())
    }

    /// Chunk `index` of complete content held here.
    pub fn read_chunk(&self, sha: &str, index: u64) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(sha);
        let offset = chunk_offset(&path, index)?;
        let mut f = File::open(&path).map_err(|e| io_err(&path, e))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| io_err(&path, e))?;
        let mut buf = Vec::with_capacity(ARTIFACT_CHUNK as usize);
        f.take(ARTIFACT_CHUNK)
            .read_to_end(&mut buf)
            .map_err(|e| io_err(&path, e))?;
        Ok(buf)
    }

    /// How many leading chunks of a fetch under way are already here and match
    /// their digests; anything after them is cut off.
    pub fn resume_point(&self, sha: &str, chunks: &[[u8; 32]]) -> Result<u64, StoreError> {
        let path = self.partial_path(sha);
        let mut f = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err(&path, e)),
        };
        let mut good = 0u64;
        let mut buf = Vec::with_capacity(ARTIFACT_CHUNK as usize);
        for want in chunks {
            buf.clear();
            (&mut f)
                .take(ARTIFACT_CHUNK)
                .read_to_end(&mut buf)
                .map_err(|e| io_err(&path, e))?;
            if buf.is_empty() || Sha256::digest(&buf).as_slice() != want {
                break;
            }
            good += 1;
        }
        // A last chunk shorter than ARTIFACT_CHUNK can only be the final one.
        let len = f.metadata().map_err(|e| io_err(&path, e))?.len();
        let keep = (good * ARTIFACT_CHUNK).min(len);
        f.set_len(keep).map_err(|e| io_err(&path, e))?;
        Ok(good)
    }

    /// Appends chunk `index` (checked by the caller) to a fetch under way.
    pub fn append_chunk(&self, sha: &str, index: u64, data: &[u8]) -> Result<(), StoreError> {
        let path = self.partial_path(sha);
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        f.seek(SeekFrom::Start(chunk_offset(&path, index)?))
            .map_err(|e| io_err(&path, e))?;
        f.write_all(data).map_err(|e| io_err(&path, e))
    }

    /// Completes a fetch: checks the whole content against `sha`, fsyncs it and
    /// moves it among the complete blobs. On a mismatch the partial file is
    /// removed and `Corrupt` returned.
    pub fn complete(&self, sha: &str, chunks: &[[u8; 32]]) -> Result<(), StoreError> {
        let path = self.partial_path(sha);
        let mut f = File::open(&path).map_err(|e| io_err(&path, e))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(|e| io_err(&path, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        let got = hex::encode(h.finalize());
        if got != sha {
            let _ = fs::remove_file(&path);
            return Err(StoreError::Corrupt {
                path,
                what: "fetched artifact".into(),
                detail: format!("content has SHA-256 {got}, expected {sha}"),
            });
        }
        f.sync_all().map_err(|e| io_err(&path, e))?;
        self.write_manifest(sha, chunks)?;
        let dest = self.blob_path(sha);
        // A collection that took its `keep` before this fetch started must not
        // remove what it just completed; the live versions decide from the next.
        let mut claims = lock(&self.claims);
        claims.entry(sha.to_string()).or_insert(Claim {
            kind: ClaimKind::Fetched,
            at: Instant::now(),
        });
        fs::rename(&path, &dest).map_err(|e| io_err(&dest, e))?;
        drop(claims);
        sync_dir(&self.dir.join("blobs"))
    }

    /// Bytes of a fetch under way that are on disk.
    pub fn partial_len(&self, sha: &str) -> u64 {
        fs::metadata(self.partial_path(sha))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Removes content whose digest is not in `keep` (the live versions and the
    /// fetches under way, as of `keep_taken`): complete content unless claimed
    /// less than `grace` ago (see `Claim`; `published` are the uploads, digest
    /// and claim number, whose publish the applied state `keep` was taken
    /// from has), a partial fetch unless it was written to in the last `grace`
    /// (a fetch that started after `keep` was taken).
    pub fn collect_garbage(
        &self,
        keep: &HashSet<String>,
        keep_taken: Instant,
        published: &HashSet<(String, u64)>,
        grace: Duration,
    ) -> Result<Vec<String>, StoreError> {
        let _collecting = lock(&self.collecting);
        lock(&self.claims).retain(|sha, c| {
            let settled = match c.kind {
                ClaimKind::FoundAtStart => keep.contains(sha),
                ClaimKind::Fetched => c.at < keep_taken,
                ClaimKind::Upload(id) => published.contains(&(sha.clone(), id)),
            };
            !settled && c.at.elapsed() < grace
        });
        let mut removed = Vec::new();
        let now = SystemTime::now();
        for sub in ["blobs", "partial"] {
            let dir = self.dir.join(sub);
            for entry in fs::read_dir(&dir).map_err(|e| io_err(&dir, e))?.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if name.ends_with(".tmp") {
                    // A manifest being written, or left by a crash: only
                    // complete files count, and `write_manifest` renames.
                    if entry_age(&entry, now) >= grace {
                        let _ = fs::remove_file(entry.path());
                    }
                    continue;
                }
                let sha = name.trim_end_matches(".chunks");
                if keep.contains(sha) {
                    continue;
                }
                // Looked at under the claims: an upload may have just taken
                // this content back (see `keep_upload`).
                let claims = lock(&self.claims);
                let spared = if sub == "blobs" {
                    claims.contains_key(sha)
                } else {
                    entry_age(&entry, now) < grace
                };
                if spared {
                    continue;
                }
                if fs::remove_file(entry.path()).is_ok() && !name.ends_with(".chunks") {
                    removed.push(sha.to_string());
                }
            }
        }
        Ok(removed)
    }
}

/// Where chunk `index` starts (a peer names the index: no overflow).
fn chunk_offset(path: &Path, index: u64) -> Result<u64, StoreError> {
    index.checked_mul(ARTIFACT_CHUNK).ok_or_else(|| {
        io_err(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("chunk {index} is beyond any artifact"),
            ),
        )
    })
}

/// How long ago a directory entry was last written (zero if unknown).
fn entry_age(entry: &fs::DirEntry, now: SystemTime) -> Duration {
    entry
        .metadata()
        .and_then(|m| m.modified())
        .map(|t| now.duration_since(t).unwrap_or_default())
        .unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn upload_keep_read_and_fetch_with_resume() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let data = content(2 * ARTIFACT_CHUNK as usize + 1234);
        let mut up = store.upload().unwrap();
        for piece in data.chunks(100_000) {
            up.write(piece).unwrap();
        }
        let (d, _) = store.keep_upload(up).unwrap();
        assert_eq!(d.sha256, hex::encode(Sha256::digest(&data)));
        assert_eq!(d.chunks.len(), 3);
        assert!(store.has(&d.sha256));
        assert_eq!(store.manifest(&d.sha256).unwrap(), d.chunks);
        assert_eq!(
            store.read_chunk(&d.sha256, 2).unwrap(),
            &data[2 * ARTIFACT_CHUNK as usize..]
        );

        // Another node fetches it: two chunks, a "restart", then the rest.
        let dir2 = tempfile::tempdir().unwrap();
        let other = ArtifactStore::open(dir2.path()).unwrap();
        for i in 0..2 {
            other
                .append_chunk(&d.sha256, i, &store.read_chunk(&d.sha256, i).unwrap())
                .unwrap();
        }
        // A torn write after them is cut off at resume.
        other.append_chunk(&d.sha256, 2, b"torn").unwrap();
        let other = ArtifactStore::open(dir2.path()).unwrap();
        assert_eq!(other.resume_point(&d.sha256, &d.chunks).unwrap(), 2);
        assert_eq!(other.partial_len(&d.sha256), 2 * ARTIFACT_CHUNK);
        other
            .append_chunk(&d.sha256, 2, &store.read_chunk(&d.sha256, 2).unwrap())
            .unwrap();
        let taken_before = Instant::now();
        other.complete(&d.sha256, &d.chunks).unwrap();
        assert!(other.has(&d.sha256));
        assert_eq!(fs::read(other.blob_path(&d.sha256)).unwrap(), data);
        // A collection whose `keep` predates the fetch's end spares it; the
        // next decides by the live versions alone.
        let (none, grace) = (HashSet::new(), Duration::from_secs(600));
        let spared = other.collect_garbage(&none, taken_before, &HashSet::new(), grace);
        assert!(spared.unwrap().is_empty());
        let removed = other.collect_garbage(&none, Instant::now(), &HashSet::new(), grace);
        assert_eq!(removed.unwrap(), vec![d.sha256.clone()]);
    }

    #[test]
    fn corrupt_content_is_never_kept_and_garbage_goes() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let sha = "a".repeat(64);
        store.append_chunk(&sha, 0, b"not the content").unwrap();
        assert!(matches!(
            store.complete(&sha, &[[0; 32]]),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(!store.has(&sha));
        assert_eq!(store.partial_len(&sha), 0);

        let mut up = store.upload().unwrap();
        up.write(b"x").unwrap();
        let (d, _) = store.keep_upload(up).unwrap();
        assert!(store
            .collect_garbage(
                &HashSet::new(),
                Instant::now(),
                &HashSet::new(),
                Duration::from_secs(60)
            )
            .unwrap()
            .is_empty());
        let removed = store
            .collect_garbage(
                &HashSet::new(),
                Instant::now(),
                &HashSet::new(),
                Duration::ZERO,
            )
            .unwrap();
        assert_eq!(removed, vec![d.sha256.clone()]);
        assert!(!store.has(&d.sha256));
        assert!(!is_sha256_hex("../etc/passwd"));

        // An upload is spared until its publish is applied, however the live
        // versions move meanwhile; then they decide.
        let upload = |body: &[u8]| {
            let mut up = store.upload().unwrap();
            up.write(body).unwrap();
            store.keep_upload(up).unwrap()
        };
        let (d, first) = upload(b"y");
        let grace = Duration::from_secs(600);
        let none: HashSet<String> = HashSet::new();
        let nothing: HashSet<(String, u64)> = HashSet::new();
        let live = HashSet::from([d.sha256.clone()]);
        let published = |id| HashSet::from([(d.sha256.clone(), id)]);
        assert!(store
            .collect_garbage(&none, Instant::now(), &nothing, grace)
            .unwrap()
            .is_empty());
        // Listed live, its publish not applied yet: still spared once retired.
        assert!(store
            .collect_garbage(&live, Instant::now(), &nothing, grace)
            .unwrap()
            .is_empty());
        assert!(store
            .collect_garbage(&none, Instant::now(), &nothing, grace)
            .unwrap()
            .is_empty());
        // The same content uploaded again: the first publish's release does not
        // release the second upload's claim.
        let (_, second) = upload(b"y");
        let first_applied = store.collect_garbage(&none, Instant::now(), &published(first), grace);
        assert!(first_applied.unwrap().is_empty());
        let second_applied =
            store.collect_garbage(&live, Instant::now(), &published(second), grace);
        assert!(second_applied.unwrap().is_empty());
        assert!(store.has(&d.sha256));
        let removed = store
            .collect_garbage(&none, Instant::now(), &nothing, grace)
            .unwrap();
        assert_eq!(removed, vec![d.sha256.clone()]);
        assert!(!store.has(&d.sha256));

        // Content found at start waits for the live versions (or the grace).
        let (z, _) = upload(b"z");
        drop(store);
        let store = ArtifactStore::open(dir.path()).unwrap();
        assert!(store
            .collect_garbage(&none, Instant::now(), &nothing, grace)
            .unwrap()
            .is_empty());
        let live = HashSet::from([z.sha256.clone()]);
        assert!(store
            .collect_garbage(&live, Instant::now(), &nothing, grace)
            .unwrap()
            .is_empty());
        assert_eq!(
            store
                .collect_garbage(&none, Instant::now(), &nothing, grace)
                .unwrap(),
            vec![z.sha256.clone()]
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("artifacts/blobs"))
            .unwrap()
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn announced_versions_survive_reopen_and_a_directory_from_before_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        assert_eq!(store.announced().unwrap(), Some(Announced::new()));
        let set = Announced::from([
            ("crm solution".to_string(), 3),
            ("a\u{e9} b".to_string(), 1),
        ]);
        store.set_announced(2, &set).unwrap();
        // A list computed earlier that finishes later does not win.
        store.set_announced(1, &Announced::new()).unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        assert_eq!(store.announced().unwrap(), Some(set));

        fs::remove_file(dir.path().join("artifacts/announced")).unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        assert_eq!(store.announced().unwrap(), None);
        fs::write(dir.path().join("artifacts/announced"), "x y\n").unwrap();
        assert!(matches!(store.announced(), Err(StoreError::Corrupt { .. })));
    }
}
