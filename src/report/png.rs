//! PNG copies of the report's figures (`tl-run report --png`), for slides and papers: each SVG
//! rasterised with resvg at twice its size on white. Text is set in a sans-serif font of the
//! system's (DejaVu Sans or Liberation Sans where installed, as on Debian); without any system
//! font the PNGs have no text, and a warning says so.
use resvg::{tiny_skia, usvg};

/// Device pixels per SVG unit: 2x, sharp on slides.
const SCALE: f32 = 2.0;

pub struct Rasteriser {
    options: usvg::Options<'static>,
}

impl Rasteriser {
    pub fn new() -> Rasteriser {
        let mut options = usvg::Options::default();
        let db = options.fontdb_mut();
        db.load_system_fonts();
        let installed: Vec<String> = db.faces().flat_map(|f| f.families.iter().map(|(name, _)| name.clone())).collect();
        match ["DejaVu Sans", "Liberation Sans", "Arial", "Helvetica", "Noto Sans"]
            .into_iter()
            .find(|f| installed.iter().any(|i| i == f))
        {
            Some(family) => {
                db.set_sans_serif_family(family);
                options.font_family = family.to_string();
            }
            None if installed.is_empty() => tracing::warn!("no system fonts found: the PNG figures will have no text"),
            None => options.font_family = installed[0].clone(),
        }
        Rasteriser { options }
    }

    /// The PNG bytes of `svg`.
    pub fn png(&self, svg: &str) -> Result<Vec<u8>, String> {
        let tree =
            usvg::Tree::from_str(svg, &self.options).map_err(|e| format!("the figure's SVG could not be read: {e}"))?;
        let size = tree.size().to_int_size().scale_by(SCALE).ok_or("the figure has no size")?;
        let mut pixmap =
            tiny_skia::Pixmap::new(size.width(), size.height()).ok_or("the figure is too large to rasterise")?;
        pixmap.fill(tiny_skia::Color::WHITE);
        resvg::render(&tree, tiny_skia::Transform::from_scale(SCALE, SCALE), &mut pixmap.as_mut());
        pixmap.encode_png().map_err(|e| format!("encoding the PNG: {e}"))
    }
}

impl Default for Rasteriser {
    fn default() -> Self {
        Rasteriser::new()
    }
}
