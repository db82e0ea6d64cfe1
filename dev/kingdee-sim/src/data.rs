//! The simulator's data set: sales orders with entry lines, customers and materials, generated
//! deterministically from a seed, shaped like the rows in the Kingdee documentation.
//!
//! Amounts are computed in cents and written as decimal strings, as the real API writes them, so that the
//! totals of an order agree exactly with its lines.

use std::sync::OnceLock;

use chrono::{Duration, NaiveDate, NaiveDateTime};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt as _, SeedableRng};
use serde::Serialize;
use serde_json::value::RawValue;

/// The local time format of the source (China Standard Time).
pub const LOCAL_TIME_FORMAT: &str = "%Y-%m-%d %H:%M:%S";

#[derive(Debug, Clone, Serialize)]
pub struct SalesOrder {
    pub id: String,
    pub bill_no: String,
    pub bill_date: String,
    /// `C` audited, `Z` not audited.
    pub bill_status: String,
    pub create_time: String,
    pub modify_time: String,
    pub audit_date: String,
    pub customer_id: String,
    pub customer_name: String,
    pub customer_number: String,
    pub dept_id: String,
    pub dept_name: String,
    pub dept_number: String,
    pub emp_id: String,
    pub emp_name: String,
    pub emp_number: String,
    pub total_amount: String,
    pub settle_status: String,
    pub currency_id: String,
    pub exchange_rate: String,
    pub remark: String,
    pub custom_field: serde_json::Value,
    pub material_entity: Vec<OrderLine>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OrderLine {
    pub id: String,
    pub seq: u32,
    pub material_id: String,
    pub material_number: String,
    pub material_name: String,
    pub qty: String,
    pub unit_name: String,
    pub price: String,
    pub tax_price: String,
    /// Tax rate in percent.
    pub cess: String,
    pub amount: String,
    pub tax_amount: String,
    pub all_amount: String,
    pub stock_name: String,
    pub batch_no: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Customer {
    pub id: String,
    pub number: String,
    pub name: String,
    pub enable: String,
    pub group_name: String,
    pub remark: String,
    pub modify_time: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Material {
    pub id: String,
    pub number: String,
    pub name: String,
    pub model: String,
    pub barcode: String,
    pub base_unit_id: String,
    pub base_unit_name: String,
    pub base_unit_number: String,
    pub parent_id: String,
    pub parent_name: String,
    pub modify_time: String,
}

/// Everything the simulator serves.
#[derive(Debug)]
pub struct Dataset {
    /// Changed only through [`Dataset::order_mut`] and the methods below, which keep `rendered` in step.
    orders: Vec<SalesOrder>,
    /// Each order's JSON, rendered when first served and dropped when the order changes: a page is then
    /// mostly a concatenation, instead of serializing every order again for every client that pages it.
    rendered: Vec<OnceLock<Box<RawValue>>>,
    pub customers: Vec<Customer>,
    pub materials: Vec<Material>,
    generator: Generator,
}

const SURNAMES: &[&str] = &["张", "王", "李", "赵", "陈", "刘", "杨", "黄", "周", "吴"];
const COMPANY_WORDS: &[&str] = &[
    "华联", "恒通", "金穗", "远航", "新源", "东方", "瑞丰", "嘉禾",
];
const PRODUCTS: &[(&str, &str)] = &[
    ("不锈钢保温杯", "个"),
    ("A4 复印纸", "箱"),
    ("无线鼠标", "个"),
    ("办公椅", "把"),
    ("LED 台灯", "台"),
    ("中性笔 0.5mm", "盒"),
    ("文件柜", "组"),
    ("打印机硒鼓", "支"),
];
const DEPARTMENTS: &[&str] = &["销售一部", "销售二部", "华东大区", "华南大区"];
const STOCKS: &[&str] = &["总仓", "上海仓", "广州仓"];

fn cents(value: i64) -> String {
    let sign = if value < 0 { "-" } else { "" };
    let value = value.abs();
    format!("{sign}{}.{:02}", value / 100, value % 100)
}

fn local(time: NaiveDateTime) -> String {
    time.format(LOCAL_TIME_FORMAT).to_string()
}

fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

/// The deterministic source of new ids and values; kept so that orders created while the simulator runs
/// continue the same sequence.
#[derive(Debug)]
struct Generator {
    rng: ChaCha8Rng,
    next_id: u64,
    orders_made: usize,
}

impl Generator {
    fn id(&mut self) -> String {
        self.next_id += self.rng.random_range(1..1_000_000);
        self.next_id.to_string()
    }

    fn order(
        &mut self,
        created: NaiveDateTime,
        modified: NaiveDateTime,
        customers: &[Customer],
        materials: &[Material],
    ) -> SalesOrder {
        self.orders_made += 1;
        let number = self.orders_made;
        let customer = pick(&mut self.rng, customers).clone();
        let line_count = self.rng.random_range(1..=4);
        let mut total = 0i64;
        let mut material_entity = Vec::with_capacity(line_count as usize);
        for seq in 1..=line_count {
            let material = pick(&mut self.rng, materials).clone();
            let qty: i64 = self.rng.random_range(1..50);
            let price_cents: i64 = self.rng.random_range(100..100_000);
            let cess: i64 = *pick(&mut self.rng, &[0, 6, 9, 13]);
            let amount = qty * price_cents;
            let tax = (amount * cess + 50) / 100;
            total += amount + tax;
            material_entity.push(OrderLine {
                id: self.id(),
                seq,
                material_id: material.id,
                material_number: material.number,
                material_name: material.name,
                qty: qty.to_string(),
                unit_name: material.base_unit_name,
                price: cents(price_cents),
                tax_price: cents((price_cents * (100 + cess) + 50) / 100),
                cess: cess.to_string(),
                amount: cents(amount),
                tax_amount: cents(tax),
                all_amount: cents(amount + tax),
                stock_name: pick(&mut self.rng, STOCKS).to_string(),
                batch_no: format!("B{}", created.format("%y%m%d")),
            });
        }
        let audited = self.rng.random_bool(0.8);
        let employee = self.rng.random_range(0..40);
        let department = self.rng.random_range(0..DEPARTMENTS.len());
        SalesOrder {
            id: self.id(),
            bill_no: format!("XSDD-{}-{number:05}", created.format("%Y%m%d")),
            bill_date: created.format("%Y-%m-%d").to_string(),
            bill_status: if audited { "C" } else { "Z" }.to_owned(),
            create_time: local(created),
            modify_time: local(modified),
            audit_date: if audited {
                modified.format("%Y-%m-%d").to_string()
            } else {
                String::new()
            },
            customer_id: customer.id,
            customer_name: customer.name,
            customer_number: customer.number,
            dept_id: format!("{}", 2_000 + department),
            dept_name: DEPARTMENTS[department].to_owned(),
            dept_number: format!("D{department:02}"),
            emp_id: format!("{}", 3_000 + employee),
            emp_name: format!(
                "{}{}",
                pick(&mut self.rng, SURNAMES),
                ["伟", "芳", "娜", "敏", "静"][employee % 5]
            ),
            emp_number: format!("E{employee:03}"),
            total_amount: cents(total),
            settle_status: pick(&mut self.rng, &["0", "1", "2"]).to_string(),
            currency_id: "1".to_owned(),
            exchange_rate: "1".to_owned(),
            remark: if self.rng.random_bool(0.2) {
                "加急，请优先发货".to_owned()
            } else {
                String::new()
            },
            custom_field: serde_json::json!({}),
            material_entity,
        }
    }
}

impl Dataset {
    /// Generates `order_count` sales orders (and customers and materials for them) from `seed`, created
    /// one after another from `epoch` (CST) on. The same seed, count and epoch always give the same data.
    pub fn generate(seed: u64, order_count: usize, epoch: NaiveDateTime) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(seed);
        let mut generator = Generator {
            next_id: 830_000_000_000_000_000u64,
            rng,
            orders_made: 0,
        };
        generator.next_id += generator.rng.random_range(0..1_000_000_000);

        let customers: Vec<Customer> = (0..(order_count / 20).max(5))
            .map(|index| Customer {
                id: generator.id(),
                number: format!("CUST{:05}", index + 1),
                name: format!(
                    "{}{}商贸有限公司",
                    pick(&mut generator.rng, COMPANY_WORDS),
                    pick(&mut generator.rng, COMPANY_WORDS)
                ),
                enable: if generator.rng.random_bool(0.95) {
                    "1"
                } else {
                    "0"
                }
                .to_owned(),
                group_name: pick(&mut generator.rng, &["零售客户", "批发客户", "大客户"])
                    .to_string(),
                remark: String::new(),
                modify_time: local(epoch - Duration::days(30) + Duration::minutes(index as i64)),
            })
            .collect();
        let materials: Vec<Material> = (0..(order_count / 10).max(PRODUCTS.len()))
            .map(|index| {
                let (name, unit) = PRODUCTS[index % PRODUCTS.len()];
                Material {
                    id: generator.id(),
                    number: format!("MAT{:05}", index + 1),
                    name: format!("{name} {}型", index / PRODUCTS.len() + 1),
                    model: format!("M-{}", generator.rng.random_range(100..999)),
                    barcode: format!("69{:011}", generator.rng.random_range(0..99_999_999_999u64)),
                    base_unit_id: format!("{}", 1_000 + index % PRODUCTS.len()),
                    base_unit_name: unit.to_owned(),
                    base_unit_number: format!("U{:02}", index % PRODUCTS.len()),
                    parent_id: "0".to_owned(),
                    parent_name: "全部".to_owned(),
                    modify_time: local(
                        epoch - Duration::days(20) + Duration::minutes(index as i64),
                    ),
                }
            })
            .collect();

        // Nothing is created or modified in the future: a timeline that would reach past now stops there.
        let now = days_ago(0);
        let mut created = epoch;
        let mut orders = Vec::with_capacity(order_count);
        for _ in 0..order_count {
            created = (created + Duration::seconds(generator.rng.random_range(1..120))).min(now);
            let modified = (created
                + Duration::seconds(generator.rng.random_range(0..3 * 24 * 3600)))
            .min(now);
            orders.push(generator.order(created, modified, &customers, &materials));
        }
        Self {
            rendered: vec![OnceLock::new(); orders.len()],
            orders,
            customers,
            materials,
            generator,
        }
    }

    /// Creates a new sales order at `now` (CST), as a user entering one at the source would.
    pub fn create_order(&mut self, now: NaiveDateTime) {
        let order = self
            .generator
            .order(now, now, &self.customers, &self.materials);
        self.orders.push(order);
        self.rendered.push(OnceLock::new());
    }

    /// Modifies the order at `index`: its modify time becomes `now` (CST) and its remark changes.
    pub fn modify_order(&mut self, index: usize, now: NaiveDateTime) {
        let order = self.order_mut(index);
        order.modify_time = local(now);
        order.remark = format!("修改于 {}", local(now));
    }

    /// Moves the order at `index` to the end of the list, as a list ordered by modify time would after
    /// a modification: the orders after it shift one place up.
    pub fn move_to_end(&mut self, index: usize) {
        let order = self.orders.remove(index);
        let rendered = self.rendered.remove(index);
        self.orders.push(order);
        self.rendered.push(rendered);
    }

    pub fn orders(&self) -> &[SalesOrder] {
        &self.orders
    }

    /// The order at `index`, to change: its rendered JSON is dropped.
    pub fn order_mut(&mut self, index: usize) -> &mut SalesOrder {
        self.rendered[index] = OnceLock::new();
        &mut self.orders[index]
    }

    /// The order at `index` as JSON, rendered once per version of the order.
    pub fn order_json(&self, index: usize) -> &RawValue {
        self.rendered[index].get_or_init(|| {
            serde_json::value::to_raw_value(&self.orders[index]).expect("orders serialize")
        })
    }

    /// Renders every order not rendered yet, so that serving them later costs only the copying.
    pub fn render_all(&self) {
        for index in 0..self.orders.len() {
            self.order_json(index);
        }
    }

    pub fn random_index(&mut self) -> usize {
        self.generator.rng.random_range(0..self.orders.len().max(1))
    }
}

/// Now less `days`, as CST local time: a timeline start for data that reaches up to the present.
pub fn days_ago(days: i64) -> NaiveDateTime {
    (chrono::Utc::now() + Duration::hours(8) - Duration::days(days)).naive_utc()
}

/// The default start of the generated data's timeline: 2025-01-01 08:00 CST.
pub fn default_epoch() -> NaiveDateTime {
    NaiveDate::from_ymd_opt(2025, 1, 1)
        .and_then(|date| date.and_hms_opt(8, 0, 0))
        .expect("a valid start time")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_data() {
        let first = Dataset::generate(7, 50, default_epoch());
        let second = Dataset::generate(7, 50, default_epoch());
        let ids = |data: &Dataset| data.orders.iter().map(|o| o.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&first), ids(&second));
        assert_ne!(ids(&first), ids(&Dataset::generate(8, 50, default_epoch())));
        assert_eq!(first.orders.len(), 50);
    }

    #[test]
    fn ids_are_unique_and_totals_add_up() {
        let data = Dataset::generate(1, 500, default_epoch());
        let mut ids: Vec<_> = data.orders.iter().map(|o| &o.id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 500);
        for order in &data.orders {
            let lines: f64 = order
                .material_entity
                .iter()
                .map(|l| l.all_amount.parse::<f64>().unwrap())
                .sum();
            let total: f64 = order.total_amount.parse().unwrap();
            assert!((lines - total).abs() < 0.001, "{} vs {}", lines, total);
            assert!(order.modify_time >= order.create_time);
        }
    }

    #[test]
    fn rendered_orders_follow_their_changes() {
        let mut data = Dataset::generate(3, 5, default_epoch());
        let rendered = |data: &Dataset| {
            serde_json::from_str::<serde_json::Value>(data.order_json(2).get()).unwrap()
        };
        assert_eq!(
            rendered(&data),
            serde_json::to_value(&data.orders[2]).unwrap()
        );
        data.modify_order(2, default_epoch() + Duration::days(400));
        assert_eq!(rendered(&data)["modify_time"], "2026-02-05 08:00:00");
        data.order_mut(2).total_amount = "N/A".into();
        assert_eq!(rendered(&data)["total_amount"], "N/A");
        data.create_order(default_epoch());
        assert_eq!(
            data.order_json(5).get(),
            serde_json::to_string(&data.orders[5]).unwrap()
        );
    }

    #[test]
    fn cents_are_written_as_decimal_text() {
        assert_eq!(cents(2020), "20.20");
        assert_eq!(cents(5), "0.05");
        assert_eq!(cents(-105), "-1.05");
    }
}
