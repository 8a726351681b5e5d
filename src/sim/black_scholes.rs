//! Black-Scholes prices and greeks for European options on a non-dividend-paying underlying.
//!
//! Units, chosen to match what option screens show:
//! - `time` is in years (calendar days / 365),
//! - `rate` and `vol` are annualised decimals (0.065 = 6.5 %),
//! - `theta` is the price change per calendar day (yearly theta / 365),
//! - `vega` is the price change per 1 percentage point of volatility (per-unit vega / 100),
//! - `delta` and `gamma` are per 1 point move of the underlying.

/// Which side of the chain a quote is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionKind {
    Call,
    Put,
}

/// Inputs of one Black-Scholes evaluation.
#[derive(Clone, Copy, Debug)]
pub struct Inputs {
    pub spot: f64,
    pub strike: f64,
    /// Years to expiry.
    pub time: f64,
    /// Continuously compounded risk-free rate.
    pub rate: f64,
    pub vol: f64,
}

/// Theoretical price and greeks, unrounded (rounding is a presentation concern).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Greeks {
    pub price: f64,
    pub delta: f64,
    pub gamma: f64,
    /// Per calendar day.
    pub theta: f64,
    /// Per 1 % of volatility.
    pub vega: f64,
}

const DAYS_PER_YEAR: f64 = 365.0;

/// Prices one option. At or past expiry (or with zero volatility) the option is worth its
/// discounted intrinsic value and has no time-dependent greeks, instead of dividing by zero.
pub fn price(kind: OptionKind, inputs: Inputs) -> Greeks {
    let Inputs {
        spot,
        strike,
        time,
        rate,
        vol,
    } = inputs;
    let discount = (-rate * time.max(0.0)).exp();

    if time <= 0.0 || vol <= 0.0 {
        let forward_intrinsic = match kind {
            OptionKind::Call => (spot - strike * discount).max(0.0),
            OptionKind::Put => (strike * discount - spot).max(0.0),
        };
        let in_the_money = forward_intrinsic > 0.0;
        let delta = match (kind, in_the_money) {
            (OptionKind::Call, true) => 1.0,
            (OptionKind::Put, true) => -1.0,
            (_, false) => 0.0,
        };
        return Greeks {
            price: forward_intrinsic,
            delta,
            gamma: 0.0,
            theta: 0.0,
            vega: 0.0,
        };
    }

    let sqrt_t = time.sqrt();
    let d1 = ((spot / strike).ln() + (rate + 0.5 * vol * vol) * time) / (vol * sqrt_t);
    let d2 = d1 - vol * sqrt_t;
    let density = norm_pdf(d1);

    let gamma = density / (spot * vol * sqrt_t);
    let vega_per_unit = spot * density * sqrt_t;
    // The decay term is shared by calls and puts; only the carry term differs.
    let decay = -spot * density * vol / (2.0 * sqrt_t);

    let (price, delta, theta_per_year) = match kind {
        OptionKind::Call => (
            spot * norm_cdf(d1) - strike * discount * norm_cdf(d2),
            norm_cdf(d1),
            decay - rate * strike * discount * norm_cdf(d2),
        ),
        OptionKind::Put => (
            strike * discount * norm_cdf(-d2) - spot * norm_cdf(-d1),
            norm_cdf(d1) - 1.0,
            decay + rate * strike * discount * norm_cdf(-d2),
        ),
    };

    Greeks {
        price,
        delta,
        gamma,
        theta: theta_per_year / DAYS_PER_YEAR,
        vega: vega_per_unit / 100.0,
    }
}

/// Standard normal density.
pub fn norm_pdf(x: f64) -> f64 {
    const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
    INV_SQRT_2PI * (-0.5 * x * x).exp()
}

/// Standard normal cumulative distribution, double precision.
///
/// Hart (1968) as given by Graeme West, "Better approximations to cumulative normal
/// functions" (2005): absolute error below 1e-14, with no dependency on a special-functions crate.
pub fn norm_cdf(x: f64) -> f64 {
    let z = x.abs();
    let tail = if z > 37.0 {
        0.0
    } else {
        let e = (-0.5 * z * z).exp();
        if z < 7.071_067_811_865_47 {
            let mut num = 3.526_249_659_989_11e-2 * z + 0.700_383_064_443_688;
            num = num * z + 6.373_962_203_531_65;
            num = num * z + 33.912_866_078_383;
            num = num * z + 112.079_291_497_871;
            num = num * z + 221.213_596_169_931;
            num = num * z + 220.206_867_912_376;
            let mut den = 8.838_834_764_831_84e-2 * z + 1.755_667_163_182_64;
            den = den * z + 16.064_177_579_207;
            den = den * z + 86.780_732_202_946_1;
            den = den * z + 296.564_248_779_674;
            den = den * z + 637.333_633_378_831;
            den = den * z + 793.826_512_519_948;
            den = den * z + 440.413_735_824_752;
            e * num / den
        } else {
            let mut b = z + 0.65;
            b = z + 4.0 / b;
            b = z + 3.0 / b;
            b = z + 2.0 / b;
            b = z + 1.0 / b;
            e / b / 2.506_628_274_631
        }
    };
    if x > 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn textbook() -> Inputs {
        Inputs {
            spot: 100.0,
            strike: 100.0,
            time: 1.0,
            rate: 0.05,
            vol: 0.2,
        }
    }

    fn assert_close(actual: f64, expected: f64, tolerance: f64, what: &str) {
        assert!(
            (actual - expected).abs() <= tolerance,
            "{what}: expected {expected}, got {actual}"
        );
    }

    #[test]
    fn normal_cdf_matches_tables() {
        assert_close(norm_cdf(0.0), 0.5, 1e-15, "N(0)");
        assert_close(norm_cdf(1.0), 0.841_344_746_068_543, 1e-13, "N(1)");
        assert_close(norm_cdf(-1.96), 0.024_997_895_148_220_4, 1e-13, "N(-1.96)");
        assert_close(norm_cdf(8.0), 1.0 - 6.220_960_574_271_78e-16, 1e-15, "N(8)");
    }

    #[test]
    fn textbook_call_matches_reference_values() {
        let call = price(OptionKind::Call, textbook());
        assert_close(call.price, 10.4506, 5e-5, "call price");
        assert_close(call.delta, 0.6368, 5e-5, "call delta");
        assert_close(call.gamma, 0.018_762, 5e-7, "gamma");
        // 37.524 per 1.00 of vol is 0.37524 per vol point.
        assert_close(call.vega, 0.375_24, 5e-6, "vega per 1%");
        // -6.414 per year.
        assert_close(call.theta * 365.0, -6.414, 5e-4, "call theta per year");
    }

    #[test]
    fn textbook_put_matches_reference_values() {
        let put = price(OptionKind::Put, textbook());
        assert_close(put.price, 5.5735, 5e-5, "put price");
        assert_close(put.delta, -0.3632, 5e-5, "put delta");
        assert_close(put.theta * 365.0, -1.658, 5e-4, "put theta per year");
    }

    #[test]
    fn put_call_parity_holds_across_strikes_and_vols() {
        for &strike in &[80.0, 95.0, 100.0, 105.0, 130.0] {
            for &vol in &[0.08, 0.2, 0.6] {
                let inputs = Inputs {
                    strike,
                    vol,
                    time: 0.25,
                    ..textbook()
                };
                let call = price(OptionKind::Call, inputs);
                let put = price(OptionKind::Put, inputs);
                let forward_gap = inputs.spot - strike * (-inputs.rate * inputs.time).exp();
                assert_close(call.price - put.price, forward_gap, 1e-9, "C - P");
                assert_close(call.delta - put.delta, 1.0, 1e-12, "delta parity");
            }
        }
    }

    #[test]
    fn expired_option_is_worth_intrinsic() {
        let inputs = Inputs {
            time: 0.0,
            strike: 90.0,
            ..textbook()
        };
        let call = price(OptionKind::Call, inputs);
        let put = price(OptionKind::Put, inputs);
        assert_eq!(call.price, 10.0);
        assert_eq!(put.price, 0.0);
        assert_eq!(call.gamma, 0.0);
    }
}
