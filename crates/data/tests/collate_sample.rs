//! The collator (DataCollatorForSeq2Seq semantics on Burn tensors), the sampler, and the JSONL writer.

use burn::backend::Flex;
use burn::tensor::Int;
use lora_data::{
    read_jsonl, write_jsonl, Collator, DataError, Example, Sampler, SamplerState, IGNORE_INDEX,
};

fn ex(ids: &[u32], prompt: usize) -> Example {
    Example {
        input_ids: ids.to_vec(),
        labels: ids
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                if i < prompt {
                    IGNORE_INDEX
                } else {
                    i64::from(t)
                }
            })
            .collect(),
        attention_mask: vec![1; ids.len()],
    }
}

fn ints(t: burn::tensor::Tensor<Flex, 2, Int>) -> (Vec<usize>, Vec<i64>) {
    let dims = t.dims().to_vec();
    (
        dims,
        t.into_data().convert::<i64>().to_vec::<i64>().unwrap(),
    )
}

#[test]
fn right_pads_to_the_longest_with_pad_minus_100_and_zero() {
    let a = ex(&[1, 2, 3], 1);
    let b = ex(&[4, 5, 6, 7, 8], 2);
    let batch = Collator::new(151643).collate::<Flex>(&[&a, &b], &Default::default());
    let (shape, ids) = ints(batch.input_ids);
    assert_eq!(shape, [2, 5]);
    assert_eq!(ids, [1, 2, 3, 151643, 151643, 4, 5, 6, 7, 8]);
    assert_eq!(
        ints(batch.labels).1,
        [-100, 2, 3, -100, -100, -100, -100, 6, 7, 8]
    );
    assert_eq!(ints(batch.attention_mask).1, [1, 1, 1, 0, 0, 1, 1, 1, 1, 1]);
}

#[test]
fn pad_to_multiple_of_8() {
    let a = ex(&[1; 9], 3);
    let c = Collator::new(0).with_pad_to_multiple_of(Some(8));
    let p = c.pad(&[&a]);
    assert_eq!((p.batch, p.seq), (1, 16));
    assert_eq!(
        &p.labels[8..],
        &[1, -100, -100, -100, -100, -100, -100, -100]
    );
    assert_eq!(p.attention_mask.iter().sum::<i64>(), 9);
    // Already a multiple: unchanged.
    assert_eq!(c.pad(&[&ex(&[1; 16], 0)]).seq, 16);
}

#[test]
fn sampler_is_a_seeded_permutation_per_epoch() {
    let s = Sampler::new(vec![1; 100], 42);
    let e0 = s.epoch_order(0);
    let mut sorted = e0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    assert_ne!(e0, (0..100).collect::<Vec<_>>());
    assert_eq!(
        e0,
        Sampler::new(vec![1; 100], 42).epoch_order(0),
        "same seed, same order"
    );
    assert_ne!(e0, s.epoch_order(1), "epochs differ");
    assert_ne!(
        e0,
        Sampler::new(vec![1; 100], 43).epoch_order(0),
        "seeds differ"
    );
    // Fixed forever: the first indices of seed 42, epoch 0 (SplitMix64 + Fisher-Yates).
    assert_eq!(&e0[..5], &FIRST_FIVE_SEED_42);
    assert_eq!(
        Sampler::new(vec![1; 5], 0).sequential().epoch_order(3),
        [0, 1, 2, 3, 4]
    );
}
const FIRST_FIVE_SEED_42: [usize; 5] = [34, 12, 62, 38, 88];

#[test]
fn resuming_mid_epoch_continues_exactly() {
    let lengths: Vec<usize> = (0..23).map(|i| (i * 7) % 11).collect();
    let mut full = Sampler::new(lengths.clone(), 7).group_by_length(4);
    let all: Vec<Vec<usize>> = (0..20).map(|_| full.next_batch(4)).collect();
    // Epochs of 23 with batches of 4: 5 full batches and one of 3, then the next epoch.
    assert_eq!(all[5].len(), 3);
    assert_eq!(all[6].len(), 4);

    let mut first = Sampler::new(lengths.clone(), 7).group_by_length(4);
    for _ in 0..9 {
        first.next_batch(4);
    }
    let saved = serde_json::to_string(&first.state()).unwrap();
    assert_eq!(
        first.state(),
        SamplerState {
            epoch: 1,
            index: 12
        }
    );
    let state: SamplerState = serde_json::from_str(&saved).unwrap();
    let mut resumed = Sampler::new(lengths.clone(), 7)
        .group_by_length(4)
        .resume(state)
        .unwrap();
    let rest: Vec<Vec<usize>> = (9..20).map(|_| resumed.next_batch(4)).collect();
    assert_eq!(rest, all[9..]);

    let bad = SamplerState {
        epoch: 0,
        index: 24,
    };
    assert!(Sampler::new(lengths, 7).resume(bad).is_err());
}

#[test]
fn group_by_length_sorts_megabatches_longest_first() {
    let lengths: Vec<usize> = (0..1000).map(|i| (i * 37) % 500).collect();
    let s = Sampler::new(lengths.clone(), 1).group_by_length(2); // mega-batches of 100
    let order = s.epoch_order(0);
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
    assert_eq!(lengths[order[0]], 499, "the longest example comes first");
    for mega in order.chunks(100).skip(1) {
        assert!(mega.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
    }
}

#[test]
fn write_jsonl_writes_in_order_and_leaves_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    std::fs::write(&out, "old contents\n").unwrap();
    let exs = vec![ex(&[1, 2], 1), ex(&[3], 0)];
    write_jsonl(&out, &exs).unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        text,
        "{\"input_ids\":[1,2],\"labels\":[-100,2],\"attention_mask\":[1,1]}\n\
         {\"input_ids\":[3],\"labels\":[3],\"attention_mask\":[1]}\n"
    );
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["out.jsonl"]);
    assert!(write_jsonl(&dir.path().join("no/such/dir/x.jsonl"), &exs).is_err());
    assert_eq!(read_jsonl(&out).unwrap(), exs);
}

#[test]
fn read_jsonl_rejects_mismatched_lists_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.jsonl");
    std::fs::write(
        &p,
        "{\"input_ids\":[1],\"labels\":[1],\"attention_mask\":[1]}\n\n\
         {\"input_ids\":[1,2],\"labels\":[1],\"attention_mask\":[1,1]}\n",
    )
    .unwrap();
    match read_jsonl(&p).unwrap_err() {
        DataError::BadExample { line, reason, .. } => {
            assert_eq!(line, 3);
            assert!(reason.contains("2, 1, 2"), "{reason}");
        }
        e => panic!("wrong error {e:?}"),
    }
    std::fs::write(&p, "{\"input_ids\":[1]}\n").unwrap();
    assert!(matches!(
        read_jsonl(&p),
        Err(DataError::BadExample { line: 1, .. })
    ));
    std::fs::write(&p, "").unwrap();
    assert!(matches!(read_jsonl(&p), Err(DataError::Empty { .. })));
}

#[test]
fn padding_free_puts_examples_back_to_back() {
    let (a, b) = (ex(&[5, 6, 7], 1), ex(&[8, 9], 0));
    let p = Collator::new(0).with_padding_free(true).pad(&[&a, &b]);
    assert_eq!((p.batch, p.seq), (1, 5));
    assert_eq!(p.input_ids, [5, 6, 7, 8, 9]);
    assert_eq!(p.attention_mask, [1; 5]);
    // Each example's first label is never a target: b's 8 would be predicted from a's 7.
    assert_eq!(p.labels, [-100, 6, 7, -100, 9]);
    assert_eq!(p.seq_lens, Some(vec![3, 2]));

    let p = Collator::new(0)
        .with_padding_free(true)
        .with_pad_to_multiple_of(Some(4))
        .pad(&[&a, &b]);
    assert_eq!(p.seq, 8);
    assert_eq!(p.input_ids, [5, 6, 7, 8, 9, 0, 0, 0]);
    assert_eq!(p.attention_mask, [1, 1, 1, 1, 1, 0, 0, 0]);
    assert_eq!(p.labels, [-100, 6, 7, -100, 9, -100, -100, -100]);
    assert_eq!(p.seq_lens, Some(vec![3, 2, 3]));

    let padded = Collator::new(0).pad(&[&a, &b]);
    assert_eq!((padded.batch, padded.seq, padded.seq_lens), (2, 3, None));
}
