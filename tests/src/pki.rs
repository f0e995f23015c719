//! A certificate authority per lab, so headscale serves real TLS that clients verify.

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use std::net::IpAddr;

/// PEM files for the lab CA and one server certificate.
pub struct LabPki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Makes a fresh CA and a server certificate for `ip` (and `dns`), signed by it.
pub fn generate(ip: IpAddr, dns: &str) -> Result<LabPki> {
    generate_with(ip, dns, false)
}

/// Like [`generate`]; with `expired_tls` the CA and the certificate expired in 2021 (a
/// forgotten test PKI), so every client must refuse the chain.
pub fn generate_with(ip: IpAddr, dns: &str, expired_tls: bool) -> Result<LabPki> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    if expired_tls {
        ca.not_before = rcgen::date_time_ymd(2020, 1, 1);
        ca.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "vdc lab CA (tests only)");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;

    let mut leaf = CertificateParams::new(vec![dns.to_string()])?;
    leaf.subject_alt_names.push(SanType::IpAddress(ip));
    leaf.distinguished_name.push(DnType::CommonName, dns);
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if expired_tls {
        leaf.not_before = rcgen::date_time_ymd(2020, 1, 1);
        leaf.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &ca)?;
    Ok(LabPki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}
