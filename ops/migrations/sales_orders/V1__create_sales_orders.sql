-- Sales orders as the sales_orders pipeline writes them. Unqualified names: the writer runs migrations
-- with the schema from CONVEYOR_PG_SCHEMA as its search path.
CREATE TABLE sales_orders (
    id              text PRIMARY KEY,
    bill_no         text NOT NULL,
    bill_date       date,
    bill_status     text,
    customer_number text,
    customer_name   text,
    total_amount    numeric(20, 2),
    created_at      timestamptz,
    modify_time     timestamptz NOT NULL,
    lines           jsonb
);

CREATE INDEX sales_orders_modify_time ON sales_orders (modify_time);
