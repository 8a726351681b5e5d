//! The seeded synthetic market shared by the storage and analytics services.
//!
//! Everything here is a pure function of the seed: the same seed gives byte-identical ticks and
//! chains, in any process, in any request order. That is what lets the analytics service compute
//! the PCR in-process and still agree exactly with the chain the storage service returns.
//!
//! Time is deliberately frozen. The series does not follow the wall clock: it is one trading
//! session of one-second ticks (09:15 to 15:30 IST) ending at [`REFERENCE_TIME`], and "now" for
//! option pricing is that same instant. A live clock would make responses change between two
//! calls and break both determinism and the storage/analytics agreement.

use chrono::{DateTime, Datelike, Duration, NaiveDate, SecondsFormat, TimeZone, Utc, Weekday};
use serde::Serialize;

use super::black_scholes::{self, Inputs, OptionKind};

/// "Now" for the simulated market: Monday 2025-01-06 15:30 IST, the close of the session.
pub const REFERENCE_TIME: i64 = 1_736_157_600;

/// Session length in seconds (09:15 to 15:30 IST); one tick per second, both ends included.
const SESSION_SECONDS: i64 = 6 * 3600 + 15 * 60;

/// Indian 91-day T-bill territory; only needs to be plausible.
pub const RISK_FREE_RATE: f64 = 0.065;

/// Strikes listed on each side of the at-the-money strike.
const STRIKES_EACH_SIDE: i64 = 10;

/// Static description of one tradable index.
#[derive(Clone, Copy, Debug)]
pub struct ProductSpec {
    pub symbol: &'static str,
    pub lot_size: u32,
    /// Centre of the seed-dependent opening price.
    pub base_spot: f64,
    pub tick_size: f64,
    /// Distance between listed strikes.
    pub strike_step: f64,
    /// Long-dated at-the-money volatility; short expiries sit above it (see [`atm_vol`]).
    pub base_vol: f64,
    /// Only NIFTY keeps weekly expiries on the exchange; the others list monthlies only.
    pub weekly_expiries: bool,
    /// Typical open interest (contracts) at the busiest strike of the nearest expiry.
    pub peak_open_interest: f64,
}

pub const PRODUCTS: [ProductSpec; 3] = [
    ProductSpec {
        symbol: "NIFTY",
        lot_size: 75,
        base_spot: 24_000.0,
        tick_size: 0.05,
        strike_step: 50.0,
        base_vol: 0.13,
        weekly_expiries: true,
        peak_open_interest: 150_000.0,
    },
    ProductSpec {
        symbol: "BANKNIFTY",
        lot_size: 35,
        base_spot: 51_000.0,
        tick_size: 0.05,
        strike_step: 100.0,
        base_vol: 0.15,
        weekly_expiries: false,
        peak_open_interest: 90_000.0,
    },
    ProductSpec {
        symbol: "FINNIFTY",
        lot_size: 65,
        base_spot: 23_500.0,
        tick_size: 0.05,
        strike_step: 50.0,
        base_vol: 0.14,
        weekly_expiries: false,
        peak_open_interest: 40_000.0,
    },
];

/// Finds a product by symbol, ignoring case; the returned spec carries the canonical symbol.
pub fn find_product(symbol: &str) -> Option<&'static ProductSpec> {
    PRODUCTS
        .iter()
        .find(|spec| spec.symbol.eq_ignore_ascii_case(symbol))
}

/// One price observation of an underlying.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tick {
    pub price: f64,
    /// Quantity traded in this second, in whole lots; the socket service streams it with the
    /// price (the storage service's tick history shows prices only).
    pub volume: u64,
    /// Unix seconds.
    pub timestamp: i64,
}

impl Tick {
    pub fn timestamp_rfc3339(&self) -> String {
        rfc3339(self.timestamp)
    }
}

/// The generated market for one seed. Building it walks every series once (a few ms); chains
/// are computed on demand because they are cheap and depend only on the seed and the spot.
#[derive(Debug)]
pub struct Market {
    seed: u64,
    /// Oldest first, one vector per entry of [`PRODUCTS`], same order.
    series: Vec<Vec<Tick>>,
}

impl Market {
    pub fn new(seed: u64) -> Market {
        let series = PRODUCTS
            .iter()
            .enumerate()
            .map(|(index, spec)| generate_series(seed, index as u64, spec))
            .collect();
        Market { seed, series }
    }

    /// The whole session for a product, oldest first.
    pub fn ticks(&self, spec: &ProductSpec) -> &[Tick] {
        &self.series[product_index(spec)]
    }

    /// The last traded price, which is what the chain is priced against.
    pub fn spot(&self, spec: &ProductSpec) -> f64 {
        self.ticks(spec)
            .last()
            .map_or(spec.base_spot, |tick| tick.price)
    }

    /// Expiries listed for a product, nearest first.
    pub fn expiries(&self, spec: &ProductSpec) -> Vec<NaiveDate> {
        expiries_for(spec)
    }

    /// Strikes listed for every expiry of a product, ascending, centred on the ATM strike.
    pub fn strikes(&self, spec: &ProductSpec) -> Vec<f64> {
        let atm = (self.spot(spec) / spec.strike_step).round() as i64;
        (-STRIKES_EACH_SIDE..=STRIKES_EACH_SIDE)
            .map(|offset| (atm + offset) as f64 * spec.strike_step)
            .collect()
    }

    /// The option chain for one expiry, or for all of them, ordered by expiry then strike.
    pub fn chain(&self, spec: &ProductSpec, only: Option<NaiveDate>) -> Vec<ChainRow> {
        let spot = self.spot(spec);
        let strikes = self.strikes(spec);
        let mut rows = Vec::new();
        for (expiry_rank, expiry) in self.expiries(spec).into_iter().enumerate() {
            if only.is_some_and(|wanted| wanted != expiry) {
                continue;
            }
            let time = years_to_expiry(expiry);
            for &strike in &strikes {
                let inputs = Inputs {
                    spot,
                    strike,
                    time,
                    rate: RISK_FREE_RATE,
                    vol: implied_vol(spec, spot, strike, time),
                };
                let quote = |kind| {
                    let mut rng = Rng::for_cell(self.seed, spec, expiry, strike, kind);
                    quote_option(spec, &mut rng, kind, inputs, expiry_rank)
                };
                rows.push(ChainRow {
                    expiry,
                    strike,
                    call: quote(OptionKind::Call),
                    put: quote(OptionKind::Put),
                });
            }
        }
        rows
    }
}

/// One strike of one expiry.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChainRow {
    #[serde(serialize_with = "serialize_date")]
    pub expiry: NaiveDate,
    pub strike: f64,
    pub call: OptionQuote,
    pub put: OptionQuote,
}

/// One side of a strike, already rounded for display: prices to the tick (2 decimals), iv and
/// greeks to 4 decimals, except gamma to 6 because index gamma is ~0.001 and 4 decimals erase it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OptionQuote {
    pub bid: f64,
    pub ask: f64,
    pub last_price: f64,
    /// Contracts traded in the session.
    pub volume: u64,
    /// Contracts open at the close.
    pub open_interest: u64,
    /// Annualised decimal (0.1325 = 13.25 %).
    pub iv: f64,
    pub delta: f64,
    pub gamma: f64,
    /// Per calendar day.
    pub theta: f64,
    /// Per 1 % of volatility.
    pub vega: f64,
}

/// Years between [`REFERENCE_TIME`] and 15:30 IST (10:00 UTC) on the expiry day.
pub fn years_to_expiry(expiry: NaiveDate) -> f64 {
    let seconds = expiry_instant(expiry) - REFERENCE_TIME;
    seconds.max(0) as f64 / (365.0 * 86_400.0)
}

/// Whole and fractional calendar days from [`REFERENCE_TIME`] to the expiry's settlement.
pub fn days_to_expiry(expiry: NaiveDate) -> f64 {
    (expiry_instant(expiry) - REFERENCE_TIME) as f64 / 86_400.0
}

fn expiry_instant(expiry: NaiveDate) -> i64 {
    expiry
        .and_hms_opt(10, 0, 0)
        .map_or(REFERENCE_TIME, |moment| moment.and_utc().timestamp())
}

/// Volatility for a strike: a term structure for the ATM level, then a smile (the square term)
/// and a put skew (the linear term, since index puts are bid for crash protection).
///
/// Moneyness is `ln(K/S) / sqrt(T)` so the smile has a similar width in "standard deviations"
/// for a 3-day and a 3-month expiry; with plain `ln(K/S)` near expiries would look flat.
pub fn implied_vol(spec: &ProductSpec, spot: f64, strike: f64, time: f64) -> f64 {
    const SMILE: f64 = 0.6;
    const SKEW: f64 = 0.12;
    let moneyness = ((strike / spot).ln() / time.max(1.0 / 365.0).sqrt()).clamp(-1.0, 1.0);
    let vol = atm_vol(spec, time) + SMILE * moneyness * moneyness - SKEW * moneyness;
    vol.clamp(0.05, 1.5)
}

/// Short expiries carry event risk, so their ATM vol sits above the long-dated level and decays
/// towards it over about a month.
pub fn atm_vol(spec: &ProductSpec, time: f64) -> f64 {
    let days = time * 365.0;
    spec.base_vol * (1.0 + 0.25 * (-days / 30.0).exp())
}

fn quote_option(
    spec: &ProductSpec,
    rng: &mut Rng,
    kind: OptionKind,
    inputs: Inputs,
    expiry_rank: usize,
) -> OptionQuote {
    let greeks = black_scholes::price(kind, inputs);
    let theo = greeks.price;
    // A quarter-percent half-spread, never tighter than one tick: deep OTM options quote 0 / 0.05.
    let half_spread = (theo * 0.0025).max(spec.tick_size);
    let bid = round_to_tick((theo - half_spread).max(0.0), spec.tick_size);
    let ask = round_to_tick(theo + half_spread, spec.tick_size).max(spec.tick_size);
    let last = round_to_tick(
        theo * (1.0 + 0.004 * (rng.next_f64() - 0.5)),
        spec.tick_size,
    )
    .clamp(bid, ask);

    let (open_interest, volume) =
        activity(spec, rng, kind, inputs.spot, inputs.strike, expiry_rank);

    OptionQuote {
        bid,
        ask,
        last_price: last,
        volume,
        open_interest,
        iv: round(inputs.vol, 4),
        delta: round(greeks.delta, 4),
        gamma: round(greeks.gamma, 6),
        theta: round(greeks.theta, 4),
        vega: round(greeks.vega, 4),
    }
}

/// Open interest and volume shaped like a real chain: writers crowd slightly OTM strikes (calls
/// above spot, puts below), round-number strikes attract extra interest, and the nearest expiry
/// is the busiest. Noise comes from the cell's own RNG so it is stable per strike.
fn activity(
    spec: &ProductSpec,
    rng: &mut Rng,
    kind: OptionKind,
    spot: f64,
    strike: f64,
    expiry_rank: usize,
) -> (u64, u64) {
    let steps_from_spot = (strike - spot) / spec.strike_step;
    let steps_from_peak = match kind {
        OptionKind::Call => steps_from_spot - 3.0,
        OptionKind::Put => steps_from_spot + 3.0,
    };
    let crowding = (-(steps_from_peak * steps_from_peak) / (2.0 * 16.0)).exp();
    let round_strike = if (strike % (spec.strike_step * 10.0)).abs() < f64::EPSILON {
        1.6
    } else {
        1.0
    };
    let term = 1.0 / (1.0 + 0.6 * expiry_rank as f64);
    let noise = 0.7 + 0.6 * rng.next_f64();
    let open_interest = (spec.peak_open_interest * crowding * round_strike * term * noise).round();
    let turnover = 0.2 + 0.9 * rng.next_f64();
    let volume = (open_interest * turnover * term).round();
    (open_interest as u64, volume as u64)
}

/// A geometric random walk with the product's long-dated volatility, one step per second.
/// The opening price moves with the seed (within about 1 %) so different seeds differ visibly.
///
/// Volume is drawn from its own stream: adding it left every price of every seed unchanged.
/// It grows with the size of the move, as real volume does around sharp moves.
fn generate_series(seed: u64, product_index: u64, spec: &ProductSpec) -> Vec<Tick> {
    const TRADING_SECONDS_PER_YEAR: f64 = 252.0 * SESSION_SECONDS as f64;
    /// Keeps the volume stream apart from the price stream of the same product.
    const VOLUME_STREAM: u64 = 0x766F_6C75_6D65; // "volume"
    let mut rng = Rng::new(mix(seed, product_index));
    let mut volume_rng = Rng::new(mix(mix(seed, product_index), VOLUME_STREAM));
    let step_vol = spec.base_vol / TRADING_SECONDS_PER_YEAR.sqrt();
    let mut price = spec.base_spot * (1.0 + 0.02 * (rng.next_f64() - 0.5));
    let start = REFERENCE_TIME - SESSION_SECONDS;
    (0..=SESSION_SECONDS)
        .map(|second| {
            let mut shock = 0.0;
            if second > 0 {
                shock = rng.next_gaussian();
                price *= (step_vol * shock - 0.5 * step_vol * step_vol).exp();
            }
            let lots = ((2.0 + 18.0 * volume_rng.next_f64()) * (1.0 + shock.abs())).round();
            Tick {
                price: round_to_tick(price, spec.tick_size),
                volume: lots as u64 * u64::from(spec.lot_size),
                timestamp: start + second,
            }
        })
        .collect()
}

/// Weekly expiries are the next four Thursdays; monthly ones are the last Thursday of the
/// current month (if still ahead) and of the two months after. Holidays are ignored.
fn expiries_for(spec: &ProductSpec) -> Vec<NaiveDate> {
    let today = reference_date();
    let mut expiries = Vec::new();
    if spec.weekly_expiries {
        let mut thursday = next_thursday_after(today);
        for _ in 0..4 {
            expiries.push(thursday);
            thursday += Duration::days(7);
        }
    }
    let mut month_start = NaiveDate::from_ymd_opt(today.year(), today.month(), 1);
    let mut monthlies = 0;
    while let Some(first) = month_start {
        if monthlies == 3 {
            break;
        }
        let monthly = last_thursday_of_month(first);
        if monthly > today {
            expiries.push(monthly);
            monthlies += 1;
        }
        month_start = first.checked_add_months(chrono::Months::new(1));
    }
    expiries.sort();
    expiries.dedup();
    expiries
}

fn reference_date() -> NaiveDate {
    Utc.timestamp_opt(REFERENCE_TIME, 0)
        .single()
        .map_or(NaiveDate::MIN, |moment| moment.date_naive())
}

fn next_thursday_after(date: NaiveDate) -> NaiveDate {
    let mut day = date + Duration::days(1);
    while day.weekday() != Weekday::Thu {
        day += Duration::days(1);
    }
    day
}

fn last_thursday_of_month(first_of_month: NaiveDate) -> NaiveDate {
    let next_month = first_of_month
        .checked_add_months(chrono::Months::new(1))
        .unwrap_or(NaiveDate::MAX);
    let mut day = next_month - Duration::days(1);
    while day.weekday() != Weekday::Thu {
        day -= Duration::days(1);
    }
    day
}

fn product_index(spec: &ProductSpec) -> usize {
    PRODUCTS
        .iter()
        .position(|known| known.symbol == spec.symbol)
        .unwrap_or(0)
}

pub fn rfc3339(unix_seconds: i64) -> String {
    DateTime::<Utc>::from_timestamp(unix_seconds, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Rounds to `decimals` places; used only for presentation.
pub fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// Snaps to the exchange tick, then to 2 decimals so 0.05 steps print without float noise.
fn round_to_tick(value: f64, tick: f64) -> f64 {
    round((value / tick).round() * tick, 2)
}

fn serialize_date<S: serde::Serializer>(
    date: &NaiveDate,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&date.format("%Y-%m-%d"))
}

/// Folds `value` into `key` through the SplitMix64 finaliser, so nearby inputs (strike 24000 vs
/// 24050) land on unrelated streams.
fn mix(key: u64, value: u64) -> u64 {
    let mut z = key ^ value.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64: a tiny, well-mixed generator whose output is fixed by its definition.
///
/// Written out rather than taken from `rand` because `rand` does not promise that a seeded
/// `StdRng` yields the same stream across versions, and byte-identical data per seed is the point.
#[derive(Clone, Debug)]
struct Rng {
    state: u64,
}

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// An independent stream per (seed, product, expiry, strike, side): a quote does not depend on
    /// which other quotes were generated before it, so filtering by expiry changes nothing.
    fn for_cell(
        seed: u64,
        spec: &ProductSpec,
        expiry: NaiveDate,
        strike: f64,
        kind: OptionKind,
    ) -> Rng {
        let mut key = seed;
        for byte in spec.symbol.bytes() {
            key = mix(key, u64::from(byte));
        }
        key = mix(key, expiry.num_days_from_ce() as u64);
        key = mix(key, strike.round() as u64);
        key = mix(key, matches!(kind, OptionKind::Call) as u64);
        Rng::new(key)
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 bits of precision.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal via Box-Muller; the second value is dropped to keep the code obvious.
    fn next_gaussian(&mut self) -> f64 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nifty() -> &'static ProductSpec {
        find_product("nifty").expect("NIFTY is listed")
    }

    #[test]
    fn same_seed_gives_identical_market() {
        let (a, b) = (Market::new(7), Market::new(7));
        for spec in &PRODUCTS {
            assert_eq!(a.ticks(spec), b.ticks(spec));
            assert_eq!(a.chain(spec, None), b.chain(spec, None));
        }
    }

    #[test]
    fn different_seed_gives_different_market() {
        let (a, b) = (Market::new(7), Market::new(8));
        assert_ne!(a.ticks(nifty()), b.ticks(nifty()));
        assert_ne!(a.chain(nifty(), None), b.chain(nifty(), None));
    }

    #[test]
    fn session_is_one_tick_per_second_ending_at_reference_time() {
        let market = Market::new(42);
        for spec in &PRODUCTS {
            let ticks = market.ticks(spec);
            assert_eq!(ticks.len() as i64, SESSION_SECONDS + 1);
            assert_eq!(ticks.last().map(|t| t.timestamp), Some(REFERENCE_TIME));
            assert!(ticks
                .windows(2)
                .all(|w| w[1].timestamp - w[0].timestamp == 1));
            // A day's walk at index volatility stays within a few percent of the centre.
            assert!(ticks
                .iter()
                .all(|t| (t.price / spec.base_spot - 1.0).abs() < 0.1));
        }
    }

    #[test]
    fn volume_is_whole_lots_and_leaves_prices_alone() {
        let market = Market::new(42);
        // The spot the storage docs show for seed 42: volume has its own random stream.
        assert_eq!(market.spot(nifty()), 24428.15);
        for spec in &PRODUCTS {
            let lot = u64::from(spec.lot_size);
            assert!(market
                .ticks(spec)
                .iter()
                .all(|t| t.volume >= lot && t.volume % lot == 0));
        }
    }

    #[test]
    fn expiries_are_future_thursdays() {
        let market = Market::new(42);
        let nifty_expiries = market.expiries(nifty());
        let names: Vec<String> = nifty_expiries.iter().map(|d| d.to_string()).collect();
        assert_eq!(
            names,
            [
                "2025-01-09",
                "2025-01-16",
                "2025-01-23",
                "2025-01-30",
                "2025-02-27",
                "2025-03-27"
            ]
        );
        let bank = find_product("BANKNIFTY").expect("listed");
        assert_eq!(market.expiries(bank).len(), 3);
    }

    #[test]
    fn chain_is_centred_on_spot_with_a_put_skew() {
        let market = Market::new(42);
        let spec = nifty();
        let spot = market.spot(spec);
        let strikes = market.strikes(spec);
        assert_eq!(strikes.len(), 21);
        assert!((strikes[10] - spot).abs() <= spec.strike_step / 2.0);

        let expiry = market.expiries(spec)[2];
        let chain = market.chain(spec, Some(expiry));
        assert_eq!(chain.len(), 21);
        let (low, atm, high) = (&chain[0], &chain[10], &chain[20]);
        assert!(low.put.iv > atm.put.iv, "OTM puts carry more vol than ATM");
        assert!(low.put.iv > high.call.iv, "skew: downside above upside");
        assert!(atm.call.delta > 0.3 && atm.call.delta < 0.7);
        assert!(chain.iter().all(|row| row.call.bid <= row.call.ask));
    }

    #[test]
    fn filtering_by_expiry_matches_the_full_chain() {
        let market = Market::new(42);
        let spec = nifty();
        let expiry = market.expiries(spec)[1];
        let full: Vec<ChainRow> = market
            .chain(spec, None)
            .into_iter()
            .filter(|row| row.expiry == expiry)
            .collect();
        assert_eq!(full, market.chain(spec, Some(expiry)));
    }
}
