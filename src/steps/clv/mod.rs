//! Customer lifetime value models: BG/NBD purchases and P(alive) ([`bgnbd`]), Gamma-Gamma
//! spend ([`gamma_gamma`]), on the special functions and optimiser they share.

pub mod bgnbd;
pub mod gamma_gamma;
pub mod optimize;
pub mod rules;
pub mod special;
pub mod step;
