//! The screenshot of a test boot: libvirt hands over what qemu's display shows as a
//! PPM image; the report keeps it as PNG.

/// A binary PPM (`P6`, 8-bit) image as PNG.
pub fn ppm_to_png(ppm: &[u8]) -> Result<Vec<u8>, String> {
    let mut fields = Vec::new();
    let mut i = 0;
    // four header fields (magic, width, height, max), separated by white space;
    // comments start with '#'
    while fields.len() < 4 && i < ppm.len() {
        while i < ppm.len() && (ppm[i].is_ascii_whitespace() || ppm[i] == b'#') {
            if ppm[i] == b'#' {
                while i < ppm.len() && ppm[i] != b'\n' {
                    i += 1;
                }
            }
            i += 1;
        }
        let start = i;
        while i < ppm.len() && !ppm[i].is_ascii_whitespace() {
            i += 1;
        }
        fields.push(String::from_utf8_lossy(&ppm[start..i]).into_owned());
    }
    let num = |k: usize| fields.get(k).and_then(|f| f.parse::<u32>().ok());
    let (Some(w), Some(h), Some(255)) = (num(1), num(2), num(3)) else {
        return Err("not an 8-bit binary PPM image".into());
    };
    if fields.first().map(String::as_str) != Some("P6") {
        return Err("not a P6 PPM image".into());
    }
    let pixels = &ppm[(i + 1).min(ppm.len())..];
    // the size comes from the guest's display: checked, never trusted
    let need = (w as usize)
        .checked_mul(h as usize)
        .and_then(|n| n.checked_mul(3))
        .unwrap_or(usize::MAX);
    if pixels.len() < need || w == 0 || h == 0 {
        return Err(format!(
            "{w}x{h} image with {} bytes of pixels",
            pixels.len()
        ));
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().map_err(|e| e.to_string())?;
        wr.write_image_data(&pixels[..need])
            .map_err(|e| e.to_string())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ppm_becomes_png() {
        let mut ppm = b"P6\n# by qemu\n2 1\n255\n".to_vec();
        ppm.extend_from_slice(&[255, 0, 0, 0, 255, 0]);
        let png = ppm_to_png(&ppm).expect("png");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(ppm_to_png(b"P5\n1 1\n255\n\0").is_err());
        assert!(ppm_to_png(b"P6\n4 4\n255\n\0\0\0").is_err());
    }

    #[test]
    fn absurd_sizes_are_refused() {
        assert!(ppm_to_png(b"P6\n4294967295 4294967295\n255\n\0").is_err());
        assert!(ppm_to_png(b"P6\n0 1\n255\n").is_err());
    }
}
