//! The UIDs the crate names (PS3.6 Annex A): transfer syntaxes, the SOP classes it serves, and
//! its own implementation class UID and version name (PS3.7 §D.3.3.2), which go into every
//! association and every Part 10 header it writes.

/// Implicit VR Little Endian (PS3.5 A.1), the default transfer syntax.
pub const IMPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2";
/// Explicit VR Little Endian (PS3.5 A.2).
pub const EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1";
/// Explicit VR Big Endian (PS3.5 A.3, retired).
pub const EXPLICIT_VR_BIG_ENDIAN: &str = "1.2.840.10008.1.2.2";
/// Deflated Explicit VR Little Endian (PS3.5 A.5).
pub const DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1.99";
/// JPIP Referenced Deflate (PS3.5 A.7).
pub const JPIP_REFERENCED_DEFLATE: &str = "1.2.840.10008.1.2.4.95";
/// JPIP HTJ2K Referenced Deflate (PS3.5 A.12).
pub const JPIP_HTJ2K_REFERENCED_DEFLATE: &str = "1.2.840.10008.1.2.4.205";

/// Verification SOP Class (PS3.4 Annex A).
pub const VERIFICATION: &str = "1.2.840.10008.1.1";

/// Query/Retrieve SOP classes (PS3.4 C.6): Patient Root and Study Root, FIND, MOVE and GET.
pub const PATIENT_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.1.1";
pub const PATIENT_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.1.2";
pub const PATIENT_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.1.3";
pub const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
pub const STUDY_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.2.2";
pub const STUDY_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.2.3";

/// Our implementation class UID and version name (PS3.7 §D.3.3.2, PS3.10 §7.1).
pub const IMPLEMENTATION_CLASS_UID: &str = "1.2.826.0.1.3680043.10.1474.1";
pub const IMPLEMENTATION_VERSION_NAME: &str = "DICOMCHAIN_01";
