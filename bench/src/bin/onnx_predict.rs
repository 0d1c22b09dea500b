//! `onnx-predict`: time `OnnxModel` parse + predict in-process, without HTTP — what a prediction
//! costs the gateway's CPU. `onnx-predict <model.onnx> [rows] [iterations]` prints µs per call
//! for a batch of `rows` copies of an iris row (the model must take 4 float features).

use std::time::Instant;

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .context("usage: onnx-predict <model.onnx> [rows] [iterations]")?;
    let rows: usize = args.next().map_or(Ok(1), |r| r.parse())?;
    let iterations: u32 = args.next().map_or(Ok(5000), |n| n.parse())?;
    let model = switchyard_serving::OnnxModel::load(std::path::Path::new(&path))?;
    let body = serde_json::json!({"inputs": vec![[5.1, 3.5, 1.4, 0.2]; rows]});
    let call = || -> anyhow::Result<()> {
        let predictions = model.predict(model.parse_input(&body)?)?;
        std::hint::black_box(predictions);
        Ok(())
    };
    for _ in 0..200 {
        call()?;
    }
    let started = Instant::now();
    for _ in 0..iterations {
        call()?;
    }
    let micros = started.elapsed().as_secs_f64() * 1e6 / f64::from(iterations);
    println!("{path}: {rows} row(s): {micros:.1} µs per parse + predict");
    Ok(())
}
